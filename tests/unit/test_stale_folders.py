"""A folder left in the store where a file must now be published
(stalefolder.py): removed when it holds only files lazyfs fetched and the
listing shows the file there now; otherwise kept, the file not placed, and
said once."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from lazyfs.filestate import FileState
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store
from support.storefiles import current_state as current
from support.storefiles import publish as _publish


def publish(store: Store, o: RemoteObject, data: bytes, *, listed: bool = True, origin: str = "fetch") -> bool:
    """Published as the listed version (what these tests are about), unless told not."""
    return _publish(store, o, data, origin, listed=listed)


def obj(key: str, data: bytes) -> RemoteObject:
    return RemoteObject("bkt", key, len(data), hashlib.md5(data).hexdigest(), 1_700_000_000 * 10**9)


def test_a_folder_of_fetched_files_is_removed_for_the_listed_file(store: Store, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    below, deeper = obj("c/x/y", b"y" * 4096), obj("c/x/d/z", b"zz")
    publish(store, below, b"y" * 4096)
    publish(store, deeper, b"zz")
    (root / "c" / "x" / "empty").mkdir()
    index = root / ".lazyfs" / "objects"
    assert len(list(index.iterdir())) == 2
    f = obj("c/x", b"f" * 4095)
    with caplog.at_level(logging.WARNING):
        assert publish(store, f, b"f" * 4095)
    assert (root / "c" / "x").read_bytes() == b"f" * 4095 and current(store, f) is FileState.CACHED
    assert [r.getMessage() for r in caplog.records] == [
        '"s3://bkt/c/x": removed the folder at "c/x" in the store, which held only fetched files the listing '
        "no longer shows"]
    assert len(list(index.iterdir())) == 1, "the removed files' index entries stayed (their bytes with them)"


def test_a_folder_stays_unless_the_listing_shows_the_file_now(store: Store, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """An old listing's version finishing after a refresh made the path a
    folder again: its listing may want what is below."""
    publish(store, obj("c/x/y", b"below"), b"below")
    f = obj("c/x", b"old file")
    with caplog.at_level(logging.WARNING):
        assert not publish(store, f, b"old file", listed=False)
        assert not publish(store, f, b"old file", listed=False)
    assert (tmp_path / "store" / "c" / "x" / "y").read_bytes() == b"below"
    assert current(store, obj("c/x/y", b"below")) is FileState.CACHED
    assert not list((tmp_path / "store" / ".lazyfs" / "tmp").glob("*.part")), "the unplaced file stayed in tmp/"
    assert not caplog.records, "a version no listing shows now is not worth a warning"


@pytest.mark.parametrize("planted", ["admin", "bake", "symlink"])
def test_a_folder_holding_what_lazyfs_did_not_fetch_stays(store: Store, tmp_path: Path, planted: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    publish(store, obj("c/x/fetched", b"fetched"), b"fetched")
    where = root / "c" / "x" / "sub" / "kept"
    where.parent.mkdir()
    if planted == "admin":
        where.write_bytes(b"an admin's copy")  # no record
    elif planted == "bake":
        publish(store, obj("c/x/sub/kept", b"baked"), b"baked", origin="bake")
    else:
        where.symlink_to("/etc/passwd")
    f = obj("c/x", b"file")
    with caplog.at_level(logging.WARNING):
        assert not publish(store, f, b"file")
    assert where.is_symlink() if planted == "symlink" else where.is_file()
    assert (root / "c" / "x" / "fetched").read_bytes() == b"fetched", "removed part of a folder that stays"
    [line] = [r.getMessage() for r in caplog.records]
    assert "c/x/sub/kept" in line and "the file is served without being kept" in line


def test_a_publish_into_a_folder_removed_meanwhile_opens_it_again(store: Store, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process removed the folder (under the publish lock) after this
    publish opened it: the rename would fail in an unlinked folder."""
    root = tmp_path / "store"
    real = store.root.open_dir

    def opened_then_removed(parts: list[str], create: bool = False, mode: int = 0o700) -> int:
        fd = real(parts, create, mode)
        if list(parts) == ["c", "x"] and (root / "c" / "x").is_dir():
            os.rmdir(root / "c" / "x")  # (empty: made by this very call)
            monkeypatch.setattr(store.root, "open_dir", real)
        return fd

    monkeypatch.setattr(store.root, "open_dir", opened_then_removed)
    y = obj("c/x/y", b"y")
    assert publish(store, y, b"y")
    assert current(store, y) is FileState.CACHED

