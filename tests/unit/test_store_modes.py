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
from lazyfs.layer import STORE_MODES
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
def test_the_mode_whose_files_have_these_bits_is_who_may_read_them(bits: int, name: str) -> None:
    assert storemodes.mode_of(bits) == name


@pytest.mark.parametrize("bits, name", [(0o400, "private"), (0o440, "group"), (0o444, "public"), (0o100400, "private"),
                                        (0o600, None), (0o644, None), (0o640, None), (0o000, None), (0o404, None)])
def test_only_a_layout_mode_lazyfs_writes_records_the_stores_mode(bits: int, name: str | None) -> None:
    """0600 is what every lazyfs before the layout followed --store-mode
    wrote, whatever the store's mode: it was read as "private", and a public
    store made by one became private at the next mount or bake."""
    assert storemodes.recorded_as(bits) == name


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


# -- a store whose layout records no mode (an older lazyfs's) ---------------------------------------------

def older(root: Path, mode: str, *keys: str) -> None:
    """A store as lazyfs before the layout followed --store-mode left it: its
    folders and files of `mode`, its layout 0600."""
    put(root, mode, *keys)
    (root / ".lazyfs/layout").chmod(0o600)


def test_a_public_store_an_older_lazyfs_made_stays_public(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its layout, 0600, was read as "private": a mount told no mode fetched
    files 0400 into it, and a bake made the whole store private, saying
    "private (it was private)"."""
    root = tmp_path / "s"
    older(root, "public", "m/a.bin", "m/sub/b.bin")
    with caplog.at_level("INFO", "lazyfs.storemodes"):
        assert put(root, None, "m/new/c.bin") == "public"
    assert modes_of(root, "m", "m/sub", "m/new", ".lazyfs") == {0o755}
    assert modes_of(root, "m/a.bin", "m/sub/b.bin", "m/new/c.bin", ".lazyfs/layout") == {0o444}
    assert caplog.messages == [f'store {root}: public, recorded now (.lazyfs/layout was 0600, which records no '
                               'mode: an older lazyfs wrote it so; found public: "m/a.bin" was open to anyone): '
                               "0 folders and 1 files given its modes"]
    (root / ".lazyfs/layout").chmod(0o600)
    assert put(root, None, follow=True) == "public", "a bake told no mode made it private"
    assert modes_of(root, "m/a.bin", "m/new/c.bin") == {0o444} and modes_of(root, "m", "m/new") == {0o755}


def modes_of(root: Path, *paths: str) -> set[int]:
    return {mode(root / p) for p in paths}


@pytest.mark.parametrize("first", ["private", "group"])
def test_a_store_an_older_lazyfs_made_keeps_the_mode_it_had(tmp_path: Path, first: str) -> None:
    root = tmp_path / "s"
    older(root, first, "m/a.bin")
    assert put(root, None, "m/b.bin") == first
    file = STORE_MODES[first].file
    assert modes_of(root, "m/a.bin", "m/b.bin", ".lazyfs/layout") == {file}


def test_a_store_that_records_no_mode_is_never_narrowed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Mixed, as older lazyfs left a store given two modes (existing folders
    kept theirs): the widest that anyone could reach of what lazyfs put there
    is its mode.  A file 0444 in a folder 0700 was no one else's to read."""
    root = tmp_path / "s"
    older(root, "private", "m/a.bin", "m/sub/b.bin", "x/c.bin")
    (root / "m/sub/b.bin").chmod(0o444)  # in m/, 0700: out of others' reach
    (root / "x").chmod(0o750)
    (root / "x/c.bin").chmod(0o440)  # its group's to read
    with caplog.at_level("INFO", "lazyfs.storemodes"):
        assert put(root, None) == "group"
    assert 'found group: "x/c.bin" was open to its group' in caplog.text
    assert modes_of(root, "m", "m/sub", "x", ".lazyfs") == {0o750}
    (root / ".lazyfs/layout").chmod(0o600)
    (root / "m/sub").chmod(0o711)  # others may enter it, and m/ too: they may read b.bin (by its name)
    (root / "m").chmod(0o755)
    (root / "m/sub/b.bin").chmod(0o444)
    assert put(root, None) == "public"
    older(tmp_path / "empty", "public")  # nothing published yet: `.lazyfs` says who may reach it
    assert put(tmp_path / "empty", None) == "public"


def test_a_store_that_records_no_mode_follows_one_it_is_told(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "s"
    older(root, "public", "m/a.bin")
    with caplog.at_level("INFO", "lazyfs.storemodes"):
        assert put(root, "private") == "private"
    assert modes_of(root, "m/a.bin", ".lazyfs/layout") == {0o400} and mode(root / "m") == 0o700
    assert caplog.messages == [f"store {root}: now private (.lazyfs/layout was 0600, which records no mode: an older "
                               "lazyfs wrote it so): 2 folders and 2 files given its modes"]


@pytest.mark.parametrize("asked, found, always, mode, walk", [
    (None, {}, False, "private", False),  # a new store
    ("public", {}, True, "public", False),
    (None, {"layout": 0o444}, False, "public", False),
    (None, {"layout": 0o444}, True, "public", True),  # a bake sets a mixed store right
    ("group", {"layout": 0o444}, False, "group", True),
    (None, {"layout": 0o600}, False, "group", True),  # records none: the mode found (group, below)
    ("private", {"layout": 0o600}, False, "private", True),
])
def test_what_a_store_is_given_and_whether_it_is_walked(asked: str | None, found: dict[str, Any], always: bool,
                                                        mode: str, walk: bool) -> None:
    plan = storemodes.decide(asked, storemodes.Found(**found), always, ("group", "m/a.bin"))
    assert (plan.mode, plan.walk) == (mode, walk)


@pytest.mark.parametrize("found, mode, seen, line", [
    ({"layout": 0o400}, "public", None, "now public (it was private)"),
    ({"layout": 0o444}, "public", None, "public (it was public)"),  # a bake set a mixed store right
    ({"layout": 0o600}, "public", ("public", "m/a.bin"), 'public, recorded now (.lazyfs/layout was 0600, which '
     'records no mode: an older lazyfs wrote it so; found public: "m/a.bin" was open to anyone)'),
    ({"layout": 0o644}, "group", ("group", "m"), '.lazyfs/layout was 0644, which records no mode; found group: "m" '
     "was open to its group)"),
    ({"layout": 0o600}, "private", ("private", ""), "found private: nothing lazyfs put there was open to other users"),
    ({"layout": 0o600}, "private", None, "now private (.lazyfs/layout was 0600, which records no mode: an older "
     "lazyfs wrote it so)"),
])
def test_the_line_says_what_was_found_and_what_changed(found: dict[str, Any], mode: str, seen: tuple[str, str] | None,
                                                       line: str) -> None:
    said = storemodes.Plan(mode, True, storemodes.Found(**found), seen).said(1, 2)
    assert said is not None and line in said and said.endswith("): 1 folders and 2 files given its modes"), said


def test_a_store_whole_in_the_mode_it_records_says_nothing() -> None:
    assert storemodes.Plan("public", True, storemodes.Found(0o444)).said(0, 0) is None
