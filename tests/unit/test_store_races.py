"""Unit tests: the store acts on the file it judged, never on whatever a name
holds by then; it never replaces a newer version with an older one; and no
error path leaves a descriptor open."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from lazyfs.errors import StoreError
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store

S = 10**9


def obj(key: str, data: bytes, mtime_s: int = 1_700_000_000) -> RemoteObject:
    return RemoteObject("bkt", key, len(data), hashlib.md5(data).hexdigest(), mtime_s * S)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def download(store: Store, o: RemoteObject, data: bytes) -> Any:
    p = store.partials.open(o, 4)
    os.pwrite(p.fd, data, 0)
    try:
        return store.publish(p)
    finally:
        os.close(p.fd)


def swap_in(path: Path, data: bytes) -> None:
    """What another process's publish does: a new file renamed over the name."""
    tmp = path.with_name(path.name + ".other")
    tmp.write_bytes(data)
    os.rename(tmp, path)


# -- acting on the file that was judged --------------------------------------------------

def test_eviction_never_unlinks_a_file_that_replaced_the_one_it_judged(store: Store, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"fetched!"
    download(store, obj("m/w.bin", data), data)
    path = tmp_path / "store" / "m/w.bin"
    read = store.identities.read

    def read_then_replaced(fd: int, *args: Any, **kw: Any) -> Any:
        ident = read(fd, *args, **kw)
        swap_in(path, b"newer version, published meanwhile")
        return ident

    monkeypatch.setattr(store.identities, "read", read_then_replaced)
    assert store.evict(["m/w.bin"]) == 0
    assert path.read_bytes() == b"newer version, published meanwhile"


def test_a_link_from_the_content_index_is_the_file_that_was_checked(store: Store, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"shared weights"
    download(store, obj("v3/w.bin", data), data)
    entry = tmp_path / "store" / ".lazyfs" / "objects" / store.index.entry_name(obj("x", data).etag, len(data))
    link_to = store.index.link_to

    def entry_replaced_then_link(*args: Any) -> None:
        swap_in(entry, b"other bytes!!!")  # same size, not what was checked
        link_to(*args)

    monkeypatch.setattr(store.index, "link_to", entry_replaced_then_link)
    copy = store.materialise(obj("v4/w.bin", data))
    assert copy is not None
    try:
        assert os.pread(copy.fd, 100, 0) == data
    finally:
        os.close(copy.fd)


# -- an older version's publish never replaces a newer one ------------------------------------

def test_an_older_versions_late_publish_leaves_the_newer_one_in_place(store: Store, tmp_path: Path) -> None:
    old, new = obj("m/w.bin", b"old!", 1_700_000_000), obj("m/w.bin", b"new!", 1_700_000_100)
    p_old = store.partials.open(old, 4)  # started first, slow
    os.pwrite(p_old.fd, b"old!", 0)
    assert download(store, new, b"new!") is True
    assert store.publish(p_old) is False, "the caller must learn that nothing was placed"
    assert os.pread(p_old.fd, 4, 0) == b"old!", "the old version's readers keep their bytes"
    os.close(p_old.fd)
    assert (tmp_path / "store" / "m/w.bin").read_bytes() == b"new!"
    copy = store.find_current(new)
    assert copy is not None
    os.close(copy.fd)
    assert not list((tmp_path / "store" / ".lazyfs" / "tmp").glob("*.part")), "the old download's file stays"


def test_a_newer_version_still_replaces_an_older_one(store: Store, tmp_path: Path) -> None:
    assert download(store, obj("m/w.bin", b"old!", 1_700_000_000), b"old!") is True
    assert download(store, obj("m/w.bin", b"new!", 1_700_000_100), b"new!") is True
    assert (tmp_path / "store" / "m/w.bin").read_bytes() == b"new!"


def test_an_older_version_made_current_again_is_placed_when_the_caller_says_so(store: Store, tmp_path: Path) -> None:
    old, new = obj("m/w.bin", b"old!", 1_700_000_000), obj("m/w.bin", b"new!", 1_700_000_100)
    assert download(store, new, b"new!") is True
    p = store.partials.open(old, 4)  # the latest version was deleted: the listing shows the old one again
    os.pwrite(p.fd, b"old!", 0)
    assert store.publish(p, keep_newer=False) is True
    p.close()
    assert (tmp_path / "store" / "m/w.bin").read_bytes() == b"old!"


# -- no descriptor left open on an error path ------------------------------------------------

def test_a_failed_store_open_closes_what_it_opened(tmp_path: Path) -> None:
    (tmp_path / "s" / ".lazyfs").mkdir(parents=True)
    (tmp_path / "s" / ".lazyfs" / "layout").write_text("99\n")
    before = open_fds()
    with pytest.raises(StoreError, match="layout version"):
        Store.open(str(tmp_path / "s"))
    (tmp_path / "t").mkdir()
    with pytest.raises(StoreError, match="cannot open prebaked layer"):
        Store.open(str(tmp_path / "t"), [str(tmp_path / "no-such-layer")])
    assert open_fds() == before


def test_judging_a_copy_that_fails_closes_it(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"abc"
    download(store, obj("m/f", data), data)

    def broken(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(store.identities, "read", broken)
    before = open_fds()
    for call in (store.find_current, store.local_state):
        with pytest.raises(OSError):
            call(obj("m/f", data))
    assert open_fds() == before
