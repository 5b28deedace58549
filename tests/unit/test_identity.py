"""Unit tests: identity records on a store whose filesystem refuses user
extended attributes (tmpfs before Linux 6.6, ramfs, many NFS exports), forced
here by making every user xattr call fail with EOPNOTSUPP, as those do."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from lazyfs.filestate import FileState
from lazyfs.listings import walk_local
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store
from support.storefiles import current_state as state
from support.storefiles import publish as download

S = 10**9


def obj(key: str, data: bytes, mtime_s: int = 1_700_000_000) -> RemoteObject:
    return RemoteObject("bkt", key, len(data), hashlib.md5(data).hexdigest(), mtime_s * S)


@pytest.fixture(autouse=True)
def no_user_xattrs(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    for name in ("setxattr", "getxattr", "listxattr", "removexattr"):
        monkeypatch.setattr(os, name, refused)


def open_store(path: Path, prebaked: tuple[Path, ...] = ()) -> Store:
    path.mkdir(exist_ok=True)
    return Store.open(str(path), [str(p) for p in prebaked])




def sidecars(root: Path) -> set[str]:
    folder = root / ".lazyfs" / "identities"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def test_a_retrained_checkpoint_of_the_same_size_is_fetched_again_after_a_restart(tmp_path: Path) -> None:
    v1, v2 = obj("m/w.bin", b"weights-1", 1_700_000_000), obj("m/w.bin", b"weights-2", 1_700_000_100)
    store = open_store(tmp_path / "s")
    download(store, v1, b"weights-1")
    assert state(store, v1) is FileState.CACHED
    store.close()
    store = open_store(tmp_path / "s")  # a restart
    try:
        assert state(store, v1) is FileState.CACHED, "lazyfs's own copy, not an admin's"
        assert state(store, v2) is None, "the same size is not the same version"
        assert store.local_state(v2).state is FileState.STALE
        assert store.identities.supported is False, "the probe at open found the filesystem refuses them"
    finally:
        store.close()


def test_an_admin_replacing_the_file_is_never_taken_for_lazyfs_copy(tmp_path: Path) -> None:
    v1 = obj("m/w.bin", b"weights-1")
    store = open_store(tmp_path / "s")
    try:
        download(store, v1, b"weights-1")
        path = tmp_path / "s" / "m/w.bin"
        os.chmod(path, 0o644)
        path.write_bytes(b"admin-cp!")  # in place: same inode, new bytes, new mtime
        assert state(store, v1) is FileState.PREBAKED, "judged as an unrecorded copy (by size)"
        download(store, v1, b"weights-1")
        (tmp_path / "admin").write_bytes(b"admin-mv!")
        os.utime(tmp_path / "admin", ns=(v1.mtime_ns, v1.mtime_ns))
        os.rename(tmp_path / "admin", path)  # a new inode, even with lazyfs's mtime
        assert state(store, v1) is FileState.PREBAKED
    finally:
        store.close()


def test_records_go_with_their_files(tmp_path: Path) -> None:
    v1, v2 = obj("m/w.bin", b"weights-1", 1_700_000_000), obj("m/w.bin", b"weights-2", 1_700_000_100)
    store = open_store(tmp_path / "s")
    try:
        download(store, v1, b"weights-1")
        first = sidecars(tmp_path / "s")
        assert len(first) == 1
        download(store, v2, b"weights-2")  # replaces v1: its record goes with it
        assert len(sidecars(tmp_path / "s")) == 1 and sidecars(tmp_path / "s") != first
        assert store.fetched_files() == [("m/w.bin", 9, (tmp_path / "s" / "m/w.bin").stat().st_atime_ns)]
        assert store.evict(["m/w.bin"]) == 9
        assert sidecars(tmp_path / "s") == set()
    finally:
        store.close()


def test_a_layer_baked_without_xattrs_keeps_its_identities(tmp_path: Path) -> None:
    v1, v2 = obj("m/w.bin", b"weights-1", 1_700_000_000), obj("m/w.bin", b"weights-2", 1_700_000_100)
    baked = open_store(tmp_path / "baked")
    download(baked, v1, b"weights-1", origin="bake")
    baked.close()
    store = open_store(tmp_path / "s", prebaked=(tmp_path / "baked",))
    try:
        copy = store.find_current(v1)
        assert copy is not None and copy.state is FileState.CACHED and copy.layer.label == "prebaked layer"
        os.close(copy.fd)
        assert state(store, v2) is None
        [(found, _label)] = walk_local(store.layers(), store.identities, "bkt", "m")
        assert found.etag == v1.etag, "an offline start lists the recorded version"
    finally:
        store.close()


def test_a_publish_that_places_nothing_leaves_no_record(tmp_path: Path) -> None:
    old, new = obj("m/w.bin", b"weights-1", 1_700_000_000), obj("m/w.bin", b"weights-2", 1_700_000_100)
    store = open_store(tmp_path / "s")
    try:
        download(store, new, b"weights-2")
        kept = sidecars(tmp_path / "s")
        download(store, old, b"weights-1")  # late, older: not placed
        (tmp_path / "s" / "blocked" / "f").mkdir(parents=True)  # a folder stands where the file goes
        download(store, obj("blocked/f", b"xyz"), b"xyz")  # not the listed version: the folder stays
        assert (tmp_path / "s" / "blocked" / "f").is_dir()
        assert sidecars(tmp_path / "s") == kept
    finally:
        store.close()


def test_a_folder_of_fetched_files_in_the_way_goes_with_their_sidecars(tmp_path: Path) -> None:
    """Where the store keeps no user xattrs, the records of the files removed
    with a folder standing where a file must go are removed too."""
    store = open_store(tmp_path / "s")
    try:
        download(store, obj("c/x/y", b"below"), b"below")
        assert len(sidecars(tmp_path / "s")) == 1
        new = obj("c/x", b"a file")
        p = store.partials.open(new, 4)
        os.pwrite(p.fd, b"a file", 0)
        try:
            assert store.publish(p, listed=True)
        finally:
            p.close()
        assert (tmp_path / "s" / "c" / "x").read_bytes() == b"a file" and state(store, new) is FileState.CACHED
        assert len(sidecars(tmp_path / "s")) == 1, "the removed file's record stayed"
    finally:
        store.close()
