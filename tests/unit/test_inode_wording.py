"""A store out of inodes is named as such (exhausted.py, doctor.py): ENOSPC
for want of an inode said "No space left on device" while `df -h` showed
271 MiB free, and `lazyfs doctor` looked only at the bytes.  The end to end
test (tests/e2e/test_store_inodes.py) runs a mount on a tmpfs with few."""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest

from lazyfs import doctor, exhausted
from lazyfs.config import DoctorConfig


def statvfs(*, blocks: int = 1 << 20, bavail: int = 1 << 19, files: int = 304, favail: int = 0,
            frsize: int = 4096) -> os.statvfs_result:
    # (f_bsize, f_frsize, f_blocks, f_bfree, f_bavail, f_files, f_ffree, f_favail, f_flag, f_namemax)
    return os.statvfs_result((4096, frsize, blocks, bavail, bavail, files, favail, favail, 0, 255))


def test_inodes_running_short_are_worded_and_plenty_or_none_counted_is_nothing() -> None:
    assert exhausted.inodes_short(statvfs(favail=0)) == "no free inodes (304 in all)"
    assert exhausted.inodes_short(statvfs(files=70_000, favail=12)) == "only 12 free inodes of 70,000"
    assert exhausted.inodes_short(statvfs(favail=200)) == ""
    assert exhausted.inodes_short(statvfs(files=0, favail=0)) == ""  # btrfs: makes them as it goes


def test_enospc_for_want_of_an_inode_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(exhausted.os, "statvfs", lambda fd: statvfs(bavail=69_376, favail=0))
    assert exhausted.no_room(full, 3) == ("No space left on device: the store's filesystem has no free inodes "
                                          "(304 in all; 271.0 MiB free)")
    monkeypatch.setattr(exhausted.os, "statvfs", lambda fd: statvfs(bavail=0, favail=200))
    assert exhausted.no_room(full, 3) == "No space left on device"  # the bytes ran out: said as it was
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    said = exhausted.no_room(OSError(errno.EMFILE, "Too many open files"), 3)  # whose limit, and what it is
    assert said.startswith(f"too many open files: the daemon's descriptor limit (ulimit -n / RLIMIT_NOFILE) is {soft}")
    assert exhausted.no_room(OSError(errno.EACCES, "Permission denied"), 3) == "Permission denied"


def store_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, st: os.statvfs_result) -> str:
    monkeypatch.setattr(doctor.os, "statvfs", lambda path: st)
    checks = doctor.store(DoctorConfig(sources=(), mountpoint=tmp_path / "mnt", store=tmp_path))
    return checks[0].line()


def test_doctor_warns_of_a_store_short_of_inodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = store_line(tmp_path, monkeypatch, statvfs(blocks=1 << 22, bavail=1 << 21, favail=0))  # 8 GiB free
    assert line.startswith(f"warn  store: {tmp_path} writable, 8.0 GiB free, 0 of 304 inodes free -> fix: "
                           "free some inodes"), line
    assert "free some space" not in line
    line = store_line(tmp_path, monkeypatch, statvfs(blocks=1 << 22, bavail=1 << 21, files=10**6, favail=900_000))
    assert line == f"ok    store: {tmp_path} writable, 8.0 GiB free, 900,000 of 1,000,000 inodes free"
    line = store_line(tmp_path, monkeypatch, statvfs(blocks=1 << 22, bavail=1 << 21, files=0, favail=0))
    assert line == f"ok    store: {tmp_path} writable, 8.0 GiB free"  # counts none: makes them as it goes
    line = store_line(tmp_path, monkeypatch, statvfs(bavail=1000, favail=5))  # both short: both fixes
    assert line.startswith("warn  store:") and "free some space" in line and "free some inodes" in line, line
