"""Unit tests: when `lazyfs status` may say ready, from a mount's stats file."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import resource
from pathlib import Path

import pytest

from lazyfs import lockfile
from lazyfs.config import StatusConfig
from lazyfs.filestate import FileState
from lazyfs.identity import Identity
from lazyfs.modeljson import Source
from lazyfs.status import (
    Answer,
    FileStatus,
    _ask_files,
    _listing_unknown,
    _no_xattrs,
    _other_lock,
    _pinned_note,
    from_lock,
    report,
)
from lazyfs.store import Store
from lazyfs.verify import Expectation


@pytest.mark.parametrize("stats, unknown", [
    ({"objects": 0, "listing": {"ok": True, "last_at": "t"}}, ""),  # listed: the folder is empty
    ({"objects": 3, "listing": {"ok": False, "last_at": "t", "error": "SlowDown"}}, ""),  # an earlier listing
    ({"objects": 3, "listing": {"ok": False, "offline": True, "error": "unreachable"}}, ""),  # the saved one
    ({"objects": 0, "listing": {"ok": False, "last_at": None}}, "the mount's first listing has not finished"),
    ({"objects": 0, "listing": {"ok": False, "last_at": "t", "error": "AccessDenied"}},
     "the mount has no listing: AccessDenied"),
    ({}, "the mount's first listing has not finished"),
])
def test_a_mount_without_a_listing_is_never_ready(stats: dict, unknown: str) -> None:
    assert _listing_unknown(stats) == unknown


@pytest.mark.parametrize("n, said", [(0, "0 files,"), (1, "1 file,"), (2, "2 files,")])
def test_the_summary_counts_in_words(n: int, said: str) -> None:
    out = io.StringIO()
    report(Answer([FileStatus(f"f{i}", 1, FileState.CACHED) for i in range(n)], "n"), False, out)
    assert out.getvalue().splitlines()[-1].startswith(said), out.getvalue()


def test_a_row_per_file_whatever_its_name_holds() -> None:
    """A key with a line separator (U+2028, which str.splitlines splits at),
    a newline or a terminal escape stays on its row, escaped as the log
    escapes it; --json keeps the name as it is."""
    names = ["m/line\u2028sep.bin", "m/new\nline.bin", "m/esc\x1b[2J.bin", "m/plain.bin"]
    out = io.StringIO()
    report(Answer([FileStatus(n, 1, FileState.CACHED) for n in names], "n"), False, out)
    rows = out.getvalue().splitlines()[1:-1]
    assert [row.split(None, 2)[2] for row in rows] == [
        "m/line\\u2028sep.bin", "m/new\\nline.bin", "m/esc\\x1b[2J.bin", "m/plain.bin"], rows
    out = io.StringIO()
    report(Answer([FileStatus(n, 1, FileState.CACHED) for n in names], "n"), True, out)
    assert [f["path"] for f in json.loads(out.getvalue())["files"]] == names


def test_nothing_unknown_and_every_file_on_disk_is_ready() -> None:
    cached = [FileStatus("a", 1, FileState.CACHED), FileStatus("b", 1, FileState.PREBAKED)]
    assert Answer(cached, "n").ready
    assert Answer([], "n").ready, "a listing that says there is nothing"
    assert not Answer(cached, "n", unknown="the mount was started with --no-xattrs").ready
    assert not Answer(cached + [FileStatus("c", 1, FileState.PARTIAL)], "n").ready


# -- against a lock (issue 14) -----------------------------------------------------------------


def _locked_store(tmp_path: Path) -> tuple[lockfile.Lock, Path]:
    """A store with three files of a lock: one recorded (as lazyfs leaves it),
    one an admin's copy without a record, one missing."""
    data = {"m/recorded.bin": b"r" * 1000, "m/bare.bin": b"b" * 1000, "m/missing.bin": b"x" * 10}
    entries = [lockfile.Entry("bkt", k, len(v), hashlib.md5(v).hexdigest(), "", 0,
                              Expectation("MD5", hashlib.md5(v).hexdigest())) for k, v in data.items()]
    lock = lockfile.make([lockfile.Folder("bkt", "m/", tuple(entries))], [], "test")
    root = tmp_path / "store"
    (root / "m").mkdir(parents=True)
    for key in ("m/recorded.bin", "m/bare.bin"):
        (root / key).write_bytes(data[key])
    store = Store.open(str(root))
    try:
        fd = os.open(root / "m/recorded.bin", os.O_RDONLY)
        store.identities.write(fd, Identity.of(entries[0].obj(), "bake", "MD5"))
        os.close(fd)
    finally:
        store.close()
    return lock, root


def test_against_a_lock_a_copy_without_a_record_is_proof_only_once_its_bytes_are_hashed(tmp_path: Path) -> None:
    lock, root = _locked_store(tmp_path)
    by_record = from_lock(StatusConfig(sources=lock.sources, store=root, lock=lock))
    assert {f.path: f.state.value for f in by_record.files} == {
        "m/recorded.bin": "cached", "m/bare.bin": "prebaked", "m/missing.bin": "missing"}
    assert "1 file has no identity record" in by_record.unknown and not by_record.ready
    (root / "m/missing.bin").write_bytes(b"x" * 10)
    by_content = from_lock(StatusConfig(sources=lock.sources, store=root, lock=lock, verify_content=True))
    assert by_content.ready and {f.content for f in by_content.files} == {"match"}
    (root / "m/bare.bin").write_bytes(b"B" * 1000)  # same size, other bytes
    changed = from_lock(StatusConfig(sources=lock.sources, store=root, lock=lock, verify_content=True))
    assert {f.path: f.state.value for f in changed.files}["m/bare.bin"] == "stale" and not changed.ready


def test_a_mount_proves_a_lock_only_when_it_serves_that_very_lock() -> None:
    lock = lockfile.make([lockfile.Folder("bkt", "m/", ())], [], "test")
    cfg = StatusConfig(sources=lock.sources, store=Path("/x"), lock=lock)
    assert "not pinned" in _other_lock(cfg, None)
    assert "serves lock sha256:000000000000" in _other_lock(cfg, {"digest": "sha256:" + "0" * 64})
    assert _other_lock(cfg, {"digest": lock.digest}) == ""
    note = _pinned_note({"digest": lock.digest, "files": 0, "unavailable": ["m/a"],
                         "drift": {"checked_at": "t", "changed": 1, "deleted": 0, "added": 2}})
    assert "drift since the lock: 1 changed, 0 deleted, 2 added" in note
    assert "; 1 locked file the bucket no longer has" in note
    two = _pinned_note({"digest": lock.digest, "files": 0, "unavailable": ["m/a", "m/b"]})
    assert "; 2 locked files the bucket no longer has" in two
    assert "drift not checked yet" in _pinned_note({"digest": lock.digest, "files": 0, "drift": {}})


@pytest.mark.parametrize("n, said", [
    (1, "1 file has no identity record to prove it is the locked version (--verify content checks its bytes)"),
    (2, "2 files have no identity record to prove they are the locked version (--verify content checks their bytes)"),
])
def test_files_without_a_record_are_counted_in_the_right_number(n: int, said: str) -> None:
    from lazyfs.status import _unproven

    assert _unproven([FileStatus(f"f{i}", 1, FileState.PREBAKED) for i in range(n)], content=False) == said


# -- a running mount's states.json (statesfile.py) ----------------------------------------------


def _mount_folder(tmp_path: Path, states: object) -> StatusConfig:
    """A folder standing for a mount: its `.lazyfs/states.json` says `states`."""
    (tmp_path / ".lazyfs").mkdir()
    (tmp_path / ".lazyfs" / "states.json").write_text(json.dumps(states))
    return StatusConfig(sources=(Source("bkt", "m/"),), store=tmp_path)


def test_states_json_rows_are_shown_in_the_walk_order_and_a_file_without_a_state_is_counted(tmp_path: Path) -> None:
    keys = ["m/b.bin", "m/a/deep/z.bin", "m/a-b/x.bin", "m/a/y.bin", "m/a.bin", "other/o.bin"]
    rows = [[k, 5, "cached" if "a" in k else "missing", "CRC32" if "a" in k else ""] for k in keys]
    rows.append(["m/unasked.bin", 5, None, None])  # its store look failed (EACCES, say)
    cfg = _mount_folder(tmp_path, {"listed": True, "files": rows})
    files, unasked = _ask_files(cfg, {})
    for k in keys + ["m/unasked.bin"]:  # the same tree on disk: os.walk's order
        (tmp_path / k).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / k).write_bytes(b"")
    walked = []
    for dirpath, dirnames, filenames in os.walk(tmp_path / "m"):
        dirnames.sort()
        walked += [os.path.relpath(os.path.join(dirpath, n), tmp_path) for n in sorted(filenames)]
    assert [f.path for f in files] == [p for p in walked if p != "m/unasked.bin"]
    assert files[0] == FileStatus("m/a.bin", 5, FileState.CACHED, "CRC32")
    assert unasked == "1 file could not be asked for its state"


@pytest.mark.parametrize("states", [[], {"listed": True}, {"listed": True, "files": [["m/a", 1, "gone", ""]]},
                                    {"listed": True, "files": [["m/a", 1]]}, {"listed": True, "files": [7]}])
def test_a_states_json_not_as_lazyfs_writes_it_is_unknown_not_ready(tmp_path: Path, states: object) -> None:
    files, unknown = _ask_files(_mount_folder(tmp_path, states), {})
    assert files == [] and unknown.startswith("cannot read the mount's .lazyfs/states.json ("), unknown


def test_before_the_first_listing_the_states_json_is_passed_over_for_the_walk(tmp_path: Path) -> None:
    cfg = _mount_folder(tmp_path, {"listed": False, "files": [["m/a.bin", 1, "cached", ""]]})
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "found.bin").write_bytes(b"x")  # no user.lazyfs.state here: "could not be asked"
    files, unasked = _ask_files(cfg, {})  # (a store folder without user xattrs: "... --no-xattrs ...")
    assert files == [] and unasked in ("1 file could not be asked for its state", _no_xattrs(cfg, {}))


# -- a descriptor refused while looking: never `missing` ---------------------------------------------


@pytest.fixture
def no_descriptor_for_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every open of a store's file (not its folders) refused, as at a low `ulimit -n`."""
    real = os.open

    def refused(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".bin") and kwargs.get("dir_fd") is not None:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refused)


SAID = "too many open files: this process's descriptor limit (ulimit -n / RLIMIT_NOFILE) is "


def test_a_copy_that_could_not_be_opened_for_want_of_a_descriptor_is_unchecked_not_missing(
        tmp_path: Path, no_descriptor_for_files: None) -> None:
    lock, root = _locked_store(tmp_path)
    answer = from_lock(StatusConfig(sources=lock.sources, store=root, lock=lock))
    assert answer.files == [] and not answer.ready  # none said missing: none could be looked at
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert answer.unknown.startswith(f"3 files could not be checked: {SAID}{limit}; raise it (ulimit -n"), \
        answer.unknown


def test_a_mount_s_state_look_refused_a_descriptor_is_a_row_without_a_state_naming_the_limit(
        tmp_path: Path, no_descriptor_for_files: None) -> None:
    from lazyfs.statesfile import _encoded, _judged

    lock, root = _locked_store(tmp_path)
    store = Store.open_to_read(str(root), [])
    try:
        rows = _judged(store, [e.obj() for e in lock.entries()], None)
    finally:
        store.close()
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    daemons = f"too many open files: the daemon's descriptor limit (ulimit -n / RLIMIT_NOFILE) is {limit}"
    assert [(state, why) for _, _, state, why in rows] == [(None, daemons)] * 3  # was: "missing"
    states = json.loads(_encoded(True, rows))
    (tmp_path / "mnt" / ".lazyfs").mkdir(parents=True)
    (tmp_path / "mnt" / ".lazyfs" / "states.json").write_text(json.dumps(states))
    files, unasked = _ask_files(StatusConfig(sources=lock.sources, store=tmp_path / "mnt"), {})
    assert files == [] and unasked == f"3 files could not be asked for their state ({daemons})", unasked
