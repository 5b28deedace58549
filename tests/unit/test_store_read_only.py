"""Unit tests: a store opened only to be judged (`lazyfs status`) is judged as
a writable one, and nothing is made or written in it: a store on a read-only
filesystem, or one the caller may read but not write, must not be refused."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from lazyfs import lockfile, status
from lazyfs.config import StatusConfig
from lazyfs.errors import StoreError
from lazyfs.filestate import FileState
from lazyfs.layer import Layer
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store
from lazyfs.verify import Expectation
from support.storefiles import publish


def obj(key: str, data: bytes) -> RemoteObject:
    return RemoteObject("bkt", key, len(data), hashlib.md5(data).hexdigest(), 1_700_000_000 * 10**9)


CACHED, BARE, PARTIAL, MISSING = (obj(f"m/{n}.bin", n.encode() * 100) for n in ("c", "b", "p", "x"))


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def made_store(root: Path) -> None:
    """A store with a recorded copy, an admin's copy, and an interrupted download."""
    s = Store.open(str(root), mode="public", create=True)
    try:
        publish(s, CACHED, b"c" * 100)
        (root / "m/b.bin").write_bytes(b"b" * 100)
        p = s.partials.open(PARTIAL, 4)
        os.pwrite(p.fd, b"pppp", 0)
        p.save_state({0})
        p.close()
    finally:
        s.close()


def states(store: Store) -> dict[str, FileState]:
    return {o.key: store.local_state(o).state for o in (CACHED, BARE, PARTIAL, MISSING)}


def test_a_look_judges_as_an_open_does_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    made_store(root)
    before = tree(root)
    look = Store.open_to_read(str(root))
    try:
        assert states(look) == {"m/c.bin": FileState.CACHED, "m/b.bin": FileState.PREBAKED,
                                "m/p.bin": FileState.PARTIAL, "m/x.bin": FileState.MISSING}
        assert look.identities.supported and look.unreadable == {}
    finally:
        look.close()
    assert tree(root) == before


def test_a_look_at_a_folder_lazyfs_never_wrote_to_makes_no_lazyfs_folder(tmp_path: Path) -> None:
    (tmp_path / "plain/m").mkdir(parents=True)
    (tmp_path / "plain/m/b.bin").write_bytes(b"b" * 100)
    look = Store.open_to_read(str(tmp_path / "plain"))
    try:
        assert states(look)["m/b.bin"] is FileState.PREBAKED
    finally:
        look.close()
    assert sorted(os.listdir(tmp_path / "plain")) == ["m"]


def test_a_look_refuses_a_store_of_another_layout(tmp_path: Path) -> None:
    root = tmp_path / "store"
    made_store(root)
    (root / ".lazyfs/layout").chmod(0o600)
    (root / ".lazyfs/layout").write_text("2\n")
    with pytest.raises(StoreError, match="layout version '2'"):
        Store.open_to_read(str(root))


def test_a_look_reads_sidecar_records_where_the_filesystem_keeps_no_xattrs(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    for name in ("setxattr", "getxattr", "listxattr", "removexattr"):
        monkeypatch.setattr(os, name, refused)
    root = tmp_path / "store"
    made_store(root)
    # Readable as the store's files are (--store-mode public), by whoever may read those.
    folder = root / ".lazyfs/identities"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o444}
    before = tree(root)
    look = Store.open_to_read(str(root))
    try:
        assert not look.identities.supported
        assert states(look)["m/c.bin"] is FileState.CACHED
    finally:
        look.close()
    assert tree(root) == before


def test_what_this_user_may_not_read_is_said_and_records_out_of_reach_are_never_ready(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(As another user: root reads every folder, so the refusal is simulated.)"""
    root = tmp_path / "store"
    made_store(root)
    entry = lockfile.Entry("bkt", CACHED.key, CACHED.size, CACHED.etag, "", 0, Expectation("MD5", CACHED.etag))
    lock = lockfile.make([lockfile.Folder("bkt", "m/", (entry,))], [], "test")
    cfg = StatusConfig(sources=lock.sources, store=root, lock=lock)
    assert status.from_lock(cfg).ready
    real = Layer.open_dir

    def private(self: Layer, parts: Any, *args: Any, **kw: Any) -> int:
        if tuple(parts) in ((".lazyfs", "tmp"), (".lazyfs", "identities")):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self, parts, *args, **kw)

    monkeypatch.setattr(Layer, "open_dir", private)
    look = Store.open_to_read(str(root))
    try:
        assert look.unreadable == {".lazyfs/tmp": "Permission denied", ".lazyfs/identities": "Permission denied"}
        assert states(look)["m/p.bin"] is FileState.MISSING  # out of sight, never "ready"
    finally:
        look.close()
    answer = status.from_lock(cfg)
    assert not answer.ready
    assert answer.unknown == "the identity records in .lazyfs/identities cannot be read by this user " \
                             "(Permission denied)"
    assert "this user cannot read .lazyfs/identities (Permission denied), .lazyfs/tmp (Permission denied)" \
        in answer.note



@pytest.mark.parametrize("where", ["lazyfs.storemeta.write_small", "lazyfs.identity.user_xattrs_work"])
def test_a_store_on_a_read_only_filesystem_is_refused_with_the_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      where: str) -> None:
    """It said `cannot use store .../ro: Read-only file system` (the probe of
    xattrs, when the store had its .lazyfs) or `store ... is not writable`: the
    README's remedy, serving such a store with --prebaked, goes in the line."""
    root = tmp_path / "ro"
    root.mkdir()

    def read_only(*_args: Any, **_kw: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(where, read_only)
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(StoreError) as e:
        Store.open(str(root), mode="public", create=True)
    assert str(e.value) == (f"cannot use store {root}: its filesystem is mounted read-only (serve a read-only "
                            f"store's files with --prebaked {root}, beside a writable --store)")
    assert e.value.errno == errno.EROFS
    assert set(os.listdir("/proc/self/fd")) <= fds
