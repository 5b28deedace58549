"""Unit tests: a store keeps the mode it records (the mode of
`.lazyfs/layout`) unless told another, and then follows the new one: its
folders, lazyfs's files in them and its metadata (storemodes.py).

Before: a store opened without a mode made what it added private whatever the
store was (a re-bake of a public image made its files 0400), and one opened
with another mode changed only what it created, so folders made before (0700)
kept the files it made public from any other user."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from lazyfs import storemodes
from lazyfs.errors import StoreError
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store
from support.storefiles import publish


def obj(key: str, data: bytes) -> RemoteObject:
    return RemoteObject("bkt", key, len(data), hashlib.md5(data).hexdigest(), 1_700_000_000 * 10**9)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def opened(root: Path, mode: str | None = None, **kw: Any) -> Store:
    return Store.open(str(root), mode=mode, create=True, **kw)


def put(root: Path, mode: str | None, *keys: str, **kw: Any) -> str:
    """Open the store as a command would, publish `keys` into it, close it;
    the mode it was opened with."""
    store = opened(root, mode, **kw)
    try:
        for key in keys:
            publish(store, obj(key, key.encode()), key.encode())
        return storemodes.mode_of(store.permissions.file)
    finally:
        store.close()


@pytest.mark.parametrize("bits, name", [(0o400, "private"), (0o600, "private"), (0o440, "group"),
                                        (0o444, "public"), (0o404, "public")])
def test_the_mode_a_store_records_is_who_may_read_its_layout(bits: int, name: str) -> None:
    assert storemodes.mode_of(bits) == name


def test_the_mode_chosen_is_the_one_asked_else_the_stores_else_private() -> None:
    assert storemodes.chosen(None, None) == "private"
    assert storemodes.chosen(None, "public") == "public"
    assert storemodes.chosen("group", "public") == "group"
    assert not storemodes.must_follow(None, "public") and not storemodes.must_follow("public", "public")
    assert storemodes.must_follow("private", "public") and storemodes.must_follow(None, "public", always=True)


def test_a_store_opened_without_a_mode_keeps_the_one_it_has(tmp_path: Path) -> None:
    root = tmp_path / "s"
    assert put(root, "public", "m/a.bin") == "public"
    assert put(root, None, "m/new/b.bin") == "public", "a store told nothing was made private again"
    assert mode(root / "m/new") == 0o755 and mode(root / "m/new/b.bin") == 0o444
    assert mode(root / "m/a.bin") == 0o444 and mode(root / ".lazyfs/layout") == 0o444
    assert put(tmp_path / "new", None, "m/a.bin") == "private"  # a new store
    assert mode(tmp_path / "new" / "m") == 0o700


@pytest.mark.parametrize("first, then, folder, file", [("private", "public", 0o755, 0o444),
                                                       ("public", "private", 0o700, 0o400),
                                                       ("private", "group", 0o750, 0o440)])
def test_a_store_told_another_mode_follows_it(tmp_path: Path, first: str, then: str, folder: int, file: int) -> None:
    root = tmp_path / "s"
    put(root, first, "m/a.bin", "m/sub/b.bin")
    (root / "m/sub/b.bin").chmod(0o500 if first == "private" else 0o555)  # baked with --file-mode 0555
    (root / "m/empty").mkdir(mode=0o700 if first == "private" else 0o755)  # its files evicted
    put(root, then)
    for path in ("m", "m/sub", "m/empty", ".lazyfs"):
        assert mode(root / path) == folder, path
    assert mode(root / "m/a.bin") == file and mode(root / ".lazyfs/layout") == file
    assert mode(root / "m/sub/b.bin") == file | (file >> 2), "an executable copy stays executable"
    for private in ("tmp", "objects", "listings"):
        if (root / ".lazyfs" / private).exists():
            assert mode(root / ".lazyfs" / private) == 0o700, private
    assert put(root, None, "m/new/c.bin") == then
    assert mode(root / "m/new") == folder and mode(root / "m/new/c.bin") == file


def test_what_lazyfs_did_not_put_in_the_store_keeps_its_mode(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir(mode=0o711)  # a folder of the user's, given as --to
    put(root, "private", "m/a.bin")
    assert mode(root) == 0o711
    (root / "admin").mkdir(mode=0o700)
    (root / "admin" / "notes.txt").write_bytes(b"mine")
    (root / "admin" / "notes.txt").chmod(0o600)
    (root / "m" / "prebaked.bin").write_bytes(b"an admin's copy")
    (root / "m" / "prebaked.bin").chmod(0o600)
    put(root, "public")
    assert mode(root) == 0o755, "the store's own folder must let others in"
    assert mode(root / "admin") == 0o700 and mode(root / "admin" / "notes.txt") == 0o600
    assert mode(root / "m" / "prebaked.bin") == 0o600
    assert mode(root / "m") == 0o755 and mode(root / "m/a.bin") == 0o444
    put(root, "private")
    assert mode(root) == 0o755, "the store's own folder is never narrowed"
    assert mode(root / "m") == 0o700 and mode(root / "m/a.bin") == 0o400 and mode(root / ".lazyfs") == 0o700


def test_sidecar_records_follow_the_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    for name in ("setxattr", "getxattr", "listxattr", "removexattr"):
        monkeypatch.setattr(os, name, refused)
    root = tmp_path / "s"
    put(root, "private", "m/a.bin")
    records = root / ".lazyfs" / "identities"
    assert mode(records) == 0o700 and {mode(p) for p in records.iterdir()} == {0o400}
    put(root, "group")
    assert mode(records) == 0o750 and {mode(p) for p in records.iterdir()} == {0o440}
    assert mode(root / "m") == 0o750 and mode(root / "m/a.bin") == 0o440


def test_a_bake_makes_a_store_of_its_own_mode_whole_again(tmp_path: Path) -> None:
    """A store an older lazyfs left mixed (a folder 0700 in a public store)
    is set right by a bake, told its mode or not; a mount leaves it."""
    root = tmp_path / "s"
    put(root, "public", "m/a.bin", "m/sub/b.bin")
    (root / "m/sub").chmod(0o700)
    put(root, "public")
    assert mode(root / "m/sub") == 0o700, "a mount walks the store only to change its mode"
    put(root, None, follow=True)
    assert mode(root / "m/sub") == 0o755


def test_a_file_that_cannot_be_given_the_mode_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "s"
    put(root, "private", "m/a.bin")
    real = os.fchmod

    def refused(fd: int, bits: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real(fd, bits)

    monkeypatch.setattr(os, "fchmod", refused)
    with pytest.raises(StoreError) as info:
        put(root, "public")
    assert str(info.value) == (f'cannot give "m/a.bin" in store {root} mode 0444 (Operation not permitted): '
                               "run as the store's owner")
    assert mode(root / ".lazyfs/layout") == 0o400, "the record is changed last: the next open tries again"
