"""What a start does with the mount it finds at its mountpoint (mounttab.check_mountpoint)."""

from __future__ import annotations

import errno
import os
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


def mounts(monkeypatch: pytest.MonkeyPatch, table: list[tuple[str, str]], answers: dict[str, int | None]) -> list[str]:
    """A mount table of (mountpoint, fstype); probes answer from `answers`.  The paths probed."""
    probed: list[str] = []

    def probe(path: Path) -> int | None:
        probed.append(str(path))
        return answers[str(path)]

    monkeypatch.setattr(mounttab, "_mounts", lambda: [MountEntry(m, t, "src", "0:1") for m, t in table])
    monkeypatch.setattr(mounttab, "probe_mount", probe)
    return probed


def test_a_path_on_or_below_a_fuse_mount_that_does_not_answer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    mounts(monkeypatch, [("/", "ext4"), ("/mnt/hung", "fuse.sshfs")], {"/mnt/hung": None})
    for path in ("/mnt/hung", "/mnt/hung/store", "/mnt/hung/a/b/../c"):
        where = "is" if path == "/mnt/hung" else "is on /mnt/hung,"  # (never "/mnt/hung is on /mnt/hung")
        with pytest.raises(MountError, match=rf"store \S+ {where} a fuse.sshfs mount that is not "
                                             r"responding; .*run: lazyfs umount --force /mnt/hung"):
            mounttab.check_answering(path, "store")


def test_a_path_on_or_below_a_dead_fuse_mount_is_refused_as_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    mounts(monkeypatch, [("/", "ext4"), ("/mnt/dead", "fuse.lazyfs")], {"/mnt/dead": errno.ENOTCONN})
    for path in ("/mnt/dead", "/mnt/dead/store"):
        where = "is" if path == "/mnt/dead" else "is on /mnt/dead,"
        with pytest.raises(MountError, match=rf"^store \S+ {where} a stale mount \(its daemon died\); "
                                             r"run: fusermount3 -uz /mnt/dead$"):
            mounttab.check_answering(path, "store")


def test_status_refuses_a_store_that_is_a_dead_mount(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lazyfs.config import status_config

    store = tmp_path / "store"
    mounts(monkeypatch, [("/", "ext4"), (str(store), "fuse.lazyfs")], {str(store): errno.ENOTCONN})
    with pytest.raises(MountError, match=rf"store {store} is a stale mount \(its daemon died\)"):
        status_config({"store": str(store), "prefix": ["s3://bucket/p"]}, {})


def test_other_paths_are_not_probed_and_a_live_mount_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    probed = mounts(monkeypatch, [("/", "ext4"), ("/mnt/hung", "fuse.lazyfs"), ("/mnt/live", "fuse.juicefs"),
                                  ("/mnt/hung/tmp", "tmpfs")], {"/mnt/hung": None, "/mnt/live": 0})
    mounttab.check_answering("/mnt/hungry/store", "store")  # a sibling whose name starts the same
    mounttab.check_answering("/var/practicus/cache", "mountpoint")
    assert probed == []
    mounttab.check_answering("/mnt/live/store", "store")
    assert probed == ["/mnt/live"]


def test_an_unmount_that_does_not_finish_is_one_line_with_the_fix(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    fake = tmp_path / "fusermount3"  # as one stuck on a mount whose daemon hangs
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(mounttab, "UNMOUNT_TIMEOUT_S", 0.2)
    fix = rf"^unmounting {MNT} did not finish in 0 s; try: lazyfs umount --force {MNT}$"
    with pytest.raises(MountError, match=fix):
        mounttab.unmount(MNT)


def test_an_unmount_refused_as_busy_names_the_lazy_unmount(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "fusermount3"  # as fusermount3 says it of a mount with files open
    fake.write_text(f"#!/bin/sh\necho 'fusermount3: failed to unmount {MNT}: Device or resource busy' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    fix = rf"^fusermount3: failed to unmount {MNT}: Device or resource busy; files on it are open: close them, " \
          rf"or detach it now and let them finish: lazyfs umount --lazy {MNT}$"
    with pytest.raises(MountError, match=fix):
        mounttab.unmount(MNT)


def test_status_refuses_a_store_that_is_a_hung_mount_of_any_kind(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    from lazyfs.config import status_config

    store = tmp_path / "store"  # never looked at: a stat of it would hang
    mounts(monkeypatch, [("/", "ext4"), (str(store), "fuse.sshfs")], {str(store): None})
    with pytest.raises(MountError, match=rf"store {store} is a fuse.sshfs mount that is not responding"):
        status_config({"store": str(store), "prefix": ["s3://bucket/p"]}, {})


def test_a_symlink_into_a_fuse_mount_that_does_not_answer_is_followed_and_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hung = tmp_path / "hung"  # never looked up: only its name is in the mount table
    mounts(monkeypatch, [("/", "ext4"), (str(hung), "fuse.sshfs")], {str(hung): None})
    (tmp_path / "data").symlink_to(hung / "models")  # absolute
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "up").symlink_to("../a")  # relative, through another link
    (tmp_path / "a").symlink_to("hung")
    for path in (tmp_path / "data" / "store", tmp_path / "b" / "up" / "x", tmp_path / "b" / "up"):
        with pytest.raises(MountError, match=rf"store {path} is on {hung}, a fuse.sshfs mount that is not "
                                             r"responding"):
            mounttab.check_answering(path, "store")


def test_symlinks_elsewhere_loops_and_missing_paths_probe_nothing(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    hung = tmp_path / "hung"
    probed = mounts(monkeypatch, [("/", "ext4"), (str(hung), "fuse.sshfs")], {str(hung): None})
    (tmp_path / "real").mkdir()
    (tmp_path / "ok").symlink_to("real")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "hungry").symlink_to("real")  # a name that starts like the mount's
    for path in (tmp_path / "ok" / "store", tmp_path / "loop" / "store", tmp_path / "missing" / "x",
                 tmp_path / "hungry", tmp_path / "ok" / ".." / "hung-not"):
        mounttab.check_answering(path, "store")
    assert probed == []


def test_a_forced_unmount_refused_for_want_of_privilege_says_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lazyfs umount --force` as a user without CAP_SYS_ADMIN: 'Operation not
    permitted' alone named no fix (a tester's)."""
    import ctypes

    class Libc:
        @staticmethod
        def umount2(path: bytes, flags: int) -> int:
            ctypes.set_errno(errno.EPERM)
            return -1

    monkeypatch.setattr(mounttab.ctypes, "CDLL", lambda *a, **kw: Libc())
    with pytest.raises(MountError, match=r"^could not force the unmount of /mnt/x: Operation not permitted "
                                         r"\(it needs root or CAP_SYS_ADMIN, as mounting does\)$"):
        mounttab.abort_and_detach("/mnt/x")
