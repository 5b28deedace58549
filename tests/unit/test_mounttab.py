"""What a start does with the mount it finds at its mountpoint (mounttab.check_mountpoint)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from lazyfs import mounttab
from lazyfs.mounttab import MountEntry, MountError, check_mountpoint

MNT = Path("/var/practicus/cache")


def found(monkeypatch: pytest.MonkeyPatch, fstype: str, state: int | None,
          abort_fails: str = "") -> list[Any]:
    """A mount of `fstype` at MNT whose probe gives `state`; the unmounts it gets."""
    done: list[Any] = []

    def abort(path: Path) -> None:
        if abort_fails:
            raise MountError(abort_fails)
        done.append("abort")

    monkeypatch.setattr(mounttab, "find_mount", lambda path: MountEntry(str(path), fstype, "src", "0:99"))
    monkeypatch.setattr(mounttab, "probe_mount", lambda path: state)
    monkeypatch.setattr(mounttab, "abort_and_detach", abort)
    monkeypatch.setattr(mounttab, "unmount", lambda path, lazy=False: done.append(("unmount", lazy)))
    return done


def test_a_dead_mount_is_detached(monkeypatch: pytest.MonkeyPatch) -> None:
    done = found(monkeypatch, "fuse.sshfs", errno.ENOTCONN)
    check_mountpoint(MNT)
    assert done == [("unmount", True)]


def test_a_lazyfs_mount_that_does_not_answer_is_aborted_and_mounted_over(monkeypatch: pytest.MonkeyPatch) -> None:
    done = found(monkeypatch, "fuse.lazyfs", None)
    check_mountpoint(MNT)
    assert done == ["abort"]


def test_another_filesystem_that_does_not_answer_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    done = found(monkeypatch, "fuse.sshfs", None)
    with pytest.raises(MountError, match=rf"not responding.*lazyfs umount --force {MNT}"):
        check_mountpoint(MNT)
    assert done == []


def test_an_abort_that_is_not_allowed_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    found(monkeypatch, "fuse.lazyfs", None, abort_fails="could not force the unmount: Operation not permitted")
    with pytest.raises(MountError, match="does not answer; could not force the unmount: Operation not permitted"):
        check_mountpoint(MNT)


def test_a_live_mount_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    done = found(monkeypatch, "fuse.lazyfs", 0)
    with pytest.raises(MountError, match="already mounted"):
        check_mountpoint(MNT)
    assert done == []
