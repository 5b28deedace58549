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


def refuse_fchmod(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """fchmod of `path` fails with EPERM, as for a file of another owner, or an immutable one."""
    real, ino = os.fchmod, path.stat().st_ino

    def refused(fd: int, bits: int) -> None:
        if os.fstat(fd).st_ino == ino:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real(fd, bits)

    monkeypatch.setattr(os, "fchmod", refused)


def test_a_file_that_cannot_be_given_the_mode_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "s"
    put(root, "private", "m/a.bin")
    refuse_fchmod(monkeypatch, root / "m/a.bin")
    owner = (root / "m/a.bin").stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1000)  # neither its owner nor root
    with pytest.raises(StoreError) as info:
        put(root, "public")
    assert str(info.value) == (f'cannot give "m/a.bin" in store {root} mode 0444 (Operation not permitted): '
                               f"it belongs to uid {owner}, not to this user (uid {owner + 1000}): "
                               "run as the store's owner")
    assert mode(root / ".lazyfs/layout") == 0o400, "the record is changed last"
    assert (root / ".lazyfs/mode-change").read_text() == "public\n", "the change is marked as under way"


def stat_of(uid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | 0o444, 1, 1, 1, uid, 0, 0, 0, 0, 0))


def test_a_mode_refused_is_explained_from_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    """EPERM said "run as the store's owner" also to the owner, and to root,
    refused by an immutable file (chattr +i): no change of user helps there."""
    from lazyfs.storewalk import cannot_give

    eperm, said = PermissionError(errno.EPERM, "Operation not permitted"), \
        'cannot give "m/b.txt" in store /s mode 0400 (Operation not permitted): '
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cannot_give("/s", "m/b.txt", 0o400, eperm, stat_of(1000)) == said + (
        'not even its owner may change it, so it is immutable or append-only: lsattr "/s/m/b.txt" shows which '
        "(chattr -i or -a, as root, lifts it)")
    assert cannot_give("/s", "m/b.txt", 0o400, eperm, stat_of(1001)).endswith(
        "it belongs to uid 1001, not to this user (uid 1000): run as the store's owner")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cannot_give("/s", "m/b.txt", 0o400, eperm, stat_of(0)).startswith(said + "not even its owner")
    assert cannot_give("/s", "m/b.txt", 0o400, eperm, stat_of(1001)) == said + (
        'not even root may change it: it is immutable or append-only (lsattr "/s/m/b.txt" shows which; chattr -i '
        "or -a lifts it), or the filesystem does not grant root its rights (NFS root_squash: run as its owner, "
        "uid 1001)")
    erofs = OSError(errno.EROFS, "Read-only file system")
    assert cannot_give("/s", ".", 0o755, erofs, stat_of(0)).endswith(
        "(Read-only file system): the store's filesystem is mounted read-only (serve a read-only store as --prebaked)")


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


# -- a change cut short --------------------------------------------------------------------------------

def cut_short(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A public store whose change to private stopped at m/b.bin (an immutable file)."""
    put(root, "public", "m/a.bin", "m/b.bin", "m/sub/c.bin")
    with monkeypatch.context() as patch:
        refuse_fchmod(patch, root / "m/b.bin")
        with pytest.raises(StoreError):
            put(root, "private")


def test_a_change_cut_short_is_finished_by_the_next_open_told_no_mode(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """It left the store mixed (files 0400 and 0444, folders 0755) with its
    record saying public: the next mount told no mode walked nothing."""
    root = tmp_path / "s"
    cut_short(root, monkeypatch)
    assert mode(root / "m/b.bin") == 0o444 and mode(root / ".lazyfs/layout") == 0o444
    with caplog.at_level("INFO", "lazyfs.storemodes"):
        assert put(root, None) == "private"
    assert modes_of(root, "m/a.bin", "m/b.bin", "m/sub/c.bin", ".lazyfs/layout") == {0o400}
    assert modes_of(root, "m", "m/sub", ".lazyfs") == {0o700}
    assert not (root / ".lazyfs/mode-change").exists()
    assert caplog.messages[-1].startswith(f"store {root}: now private (it was public; a change to private was cut "
                                          "short: finished now): ")
    caplog.clear()
    with caplog.at_level("INFO", "lazyfs.storemodes"):
        assert put(root, None) == "private"
    assert caplog.messages == [], "a store whole in its mode is not walked"


def test_a_change_cut_short_gives_way_to_a_mode_given_now(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "s"
    cut_short(root, monkeypatch)
    with caplog.at_level("INFO", "lazyfs.storemodes"):
        assert put(root, "public") == "public"
    assert modes_of(root, "m/a.bin", "m/b.bin", "m/sub/c.bin", ".lazyfs/layout") == {0o444}
    assert not (root / ".lazyfs/mode-change").exists()
    assert caplog.messages[-1].startswith(f"store {root}: public again (it was public; a change to private was cut "
                                          "short: undone now): ")


@pytest.mark.parametrize("asked, found, always, mode, walk", [
    (None, {}, False, "private", False),  # a new store
    ("public", {}, True, "public", False),
    (None, {"layout": 0o444}, False, "public", False),
    (None, {"layout": 0o444}, True, "public", True),  # a bake sets a mixed store right
    ("group", {"layout": 0o444}, False, "group", True),
    (None, {"layout": 0o444, "under_way": "private"}, False, "private", True),  # a change cut short: finished
    ("public", {"layout": 0o444, "under_way": "private"}, False, "public", True),  # ... or undone, when told
    (None, {"layout": 0o444, "under_way": "bogus"}, False, "public", True),
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
    ({"layout": 0o444, "under_way": "private"}, "private", None,
     "now private (it was public; a change to private was cut short: finished now)"),
    ({"layout": 0o444, "under_way": "private"}, "public", None,
     "public again (it was public; a change to private was cut short: undone now)"),
    ({"layout": 0o444, "under_way": "private"}, "group", None,
     "now group (it was public; a change to private was cut short: replaced by this one now)"),
    ({"layout": 0o444, "under_way": ""}, "public", None, "public (it was public; a change of mode was cut short: "
     "made whole now)"),
])
def test_the_line_says_what_was_found_and_what_changed(found: dict[str, Any], mode: str, seen: tuple[str, str] | None,
                                                       line: str) -> None:
    said = storemodes.Plan(mode, True, storemodes.Found(**found), seen).said(1, 2)
    assert said is not None and line in said and said.endswith("): 1 folders and 2 files given its modes"), said


def test_a_store_whole_in_the_mode_it_records_says_nothing() -> None:
    assert storemodes.Plan("public", True, storemodes.Found(0o444)).said(0, 0) is None
    assert storemodes.Plan("public", True, storemodes.Found(0o444, "public")).said(0, 0) is not None
