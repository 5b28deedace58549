"""Which opens the kernel serves from the local copy (passthrough.Passthrough):
the kernel's rules kept with a fake kernel that enforces them as
fs/fuse/iomode.c does."""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Iterator

import pytest

from lazyfs import doctor
from lazyfs.passthrough import Passthrough, is_remote_fstype, kernel_passes_through


class FakeKernel:
    """Backing ids as FUSE_DEV_IOC_BACKING_OPEN/_CLOSE hand them out, and an
    inode's io mode as the kernel keeps it: cached opens and passthrough opens
    never at once, one backing id per inode."""

    def __init__(self, refuse: int | None = None) -> None:
        self.refuse = refuse
        self.live: set[int] = set()
        self.next = 1
        self.registered = 0

    def register(self, fd: int) -> int:
        os.fstat(fd)
        if self.refuse is not None:
            raise OSError(self.refuse, os.strerror(self.refuse))
        self.registered += 1
        self.live.add(self.next)
        self.next += 1
        return self.next - 1

    def unregister(self, backing_id: int) -> None:
        self.live.remove(backing_id)


@pytest.fixture
def fd() -> Iterator[tuple[int, int]]:
    """A local copy: its descriptor and its filesystem's st_dev."""
    with tempfile.TemporaryFile() as f:
        yield f.fileno(), os.fstat(f.fileno()).st_dev


def local(dev: int) -> str | None:
    return "ext4"


def opened(pt: Passthrough, opens: list[tuple[int, int, tuple[int, int] | None]]) -> list[int]:
    return [pt.open(fh, ino, fd) for fh, ino, fd in opens]


def test_a_complete_copy_is_passed_through_and_its_id_dropped_after_the_last_handle(fd: tuple[int, int]) -> None:
    kernel = FakeKernel()
    pt = Passthrough(kernel.register, kernel.unregister, local)
    a, b = opened(pt, [(1, 7, fd), (2, 7, fd)])
    assert a == b == 1 and kernel.registered == 1, "one backing id per inode"
    pt.release(1)
    assert kernel.live == {1}, "the other handle still reads through it"
    pt.release(2)
    assert kernel.live == set()
    assert pt.open(3, 7, fd) == 2, "a later open registers its copy again"


def test_an_inode_open_through_the_page_cache_stays_so_until_all_such_handles_close(fd: tuple[int, int]) -> None:
    kernel = FakeKernel()
    pt = Passthrough(kernel.register, kernel.unregister, local)
    # Opened while downloading (no local copy yet), then complete: mixing
    # the two modes on one inode fails the second open in the kernel.
    assert opened(pt, [(1, 7, None), (2, 7, fd)]) == [0, 0]
    pt.release(1)
    assert pt.open(3, 7, fd) == 0, "handle 2 still reads through the page cache"
    pt.release(2)
    pt.release(3)
    assert pt.open(4, 7, fd) == 1
    assert pt.open(5, 7, None) == 1, "a passthrough inode's handles all share its backing file"


def test_inodes_are_independent(fd: tuple[int, int]) -> None:
    kernel = FakeKernel()
    pt = Passthrough(kernel.register, kernel.unregister, local)
    assert opened(pt, [(1, 7, None), (2, 8, fd), (3, 9, fd)]) == [0, 1, 2]


def test_copies_on_network_or_fuse_filesystems_are_served_through_lazyfs(fd: tuple[int, int]) -> None:
    for fstype in ("nfs4", "fuse.bindfs", "cifs", "fuse"):
        kernel = FakeKernel()
        pt = Passthrough(kernel.register, kernel.unregister, lambda dev, fstype=fstype: fstype)
        assert pt.open(1, 7, fd) == 0 and kernel.registered == 0, fstype
    assert not is_remote_fstype("ext4") and not is_remote_fstype("overlay") and not is_remote_fstype(None)


def test_a_kernel_without_passthrough_turns_it_off_for_good(fd: tuple[int, int],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    kernel = FakeKernel(refuse=errno.EPERM)
    pt = Passthrough(kernel.register, kernel.unregister, local)
    assert opened(pt, [(1, 7, fd), (2, 8, fd)]) == [0, 0]
    assert not pt.enabled
    assert sum("passthrough unavailable" in r.message for r in caplog.records) == 1


def test_a_filesystem_the_kernel_refuses_is_served_through_lazyfs_and_passthrough_stays_on(
        fd: tuple[int, int], caplog: pytest.LogCaptureFixture) -> None:
    kernel = FakeKernel(refuse=errno.ELOOP)  # backing files stacked too deep
    pt = Passthrough(kernel.register, kernel.unregister, local)
    assert pt.open(1, 7, fd) == 0 and pt.enabled
    assert pt.open(2, 8, fd) == 0, "the same filesystem is not asked again"
    assert sum("refused a copy" in r.message for r in caplog.records) == 1
    kernel.refuse = None
    assert pt.open(3, 9, (fd[0], fd[1] + 1)) == 1, "a copy on another filesystem passes through"


def test_handles_of_a_forgotten_inode_are_dropped(fd: tuple[int, int]) -> None:
    kernel = FakeKernel()
    pt = Passthrough(kernel.register, kernel.unregister, local)
    opened(pt, [(1, 7, fd), (2, 7, fd)])
    pt.release_inode(7)
    assert kernel.live == set()
    pt.release(1)  # a late release of a dropped handle is nothing


def test_unavailable_passthrough_serves_everything_through_lazyfs(fd: tuple[int, int]) -> None:
    pt = Passthrough(None, lambda backing_id: None, local)
    assert not pt.enabled and pt.open(1, 7, fd) == 0
    pt.release(1)


def test_kernel_versions() -> None:
    assert [kernel_passes_through(r) for r in ("6.8.12", "6.9.0", "6.18.44-fc-v1252", "7.0.1", "6.10-rc1", "x")] \
        == [False, True, True, True, True, False]


@pytest.mark.parametrize("release, pyfuse3, cap, status, says", [
    ("6.18.4", "3.5.0+passthrough", True, "ok", "the kernel reads complete copies itself"),
    ("6.1.0", "3.5.0+passthrough", True, "warn", "Linux 6.1.0 is older than 6.9"),
    ("6.18.4", "3.5.0", True, "warn", "pyfuse3 3.5.0 cannot ask for it"),
    ("6.18.4", "3.5.0+passthrough", False, "warn", "no CAP_SYS_ADMIN"),
])
def test_doctor_says_whether_the_kernel_will_read_copies_itself(monkeypatch: pytest.MonkeyPatch, release: str,
                                                                pyfuse3: str, cap: bool, status: str,
                                                                says: str) -> None:
    monkeypatch.setattr(doctor.os, "uname", lambda: os.uname_result(("Linux", "h", release, "#1", "x86_64")))
    monkeypatch.setattr(doctor.importlib.metadata, "version", lambda name: pyfuse3)
    monkeypatch.setattr(doctor, "has_cap_sys_admin", lambda: cap)
    [check] = doctor.passthrough(None)  # type: ignore[arg-type]
    assert check.status == status and says in check.detail, check.line()


@pytest.mark.parametrize("release, asks, status, says", [
    ("6.18.4", True, "ok", "skips the mount's page cache"),
    ("6.5.13", True, "warn", "Linux 6.5.13 is older than 6.6"),
    ("6.18.4", False, "warn", "this pyfuse3 cannot ask for it"),
])
def test_doctor_says_whether_big_files_read_as_they_arrive_skip_the_page_cache(
        monkeypatch: pytest.MonkeyPatch, release: str, asks: bool, status: str, says: str) -> None:
    from lazyfs import fuse_ops

    monkeypatch.setattr(doctor.os, "uname", lambda: os.uname_result(("Linux", "h", release, "#1", "x86_64")))
    monkeypatch.setattr(fuse_ops, "ASKS_TO_MAP_DIRECT_HANDLES", asks)
    [check] = doctor.direct_reads(None)  # type: ignore[arg-type]
    assert check.status == status and says in check.detail, check.line()


@pytest.mark.parametrize("hook, status, says", [
    (True, "ok", "dies at once"),
    (False, "warn", "does not pass the kernel's interrupts on"),
])
def test_doctor_says_whether_a_killed_reader_dies_at_once(monkeypatch: pytest.MonkeyPatch, hook: bool, status: str,
                                                          says: str) -> None:
    from lazyfs import fuse_ops

    monkeypatch.setattr(fuse_ops, "HEARS_INTERRUPTS", hook)
    [check] = doctor.killed_readers(None)  # type: ignore[arg-type]
    assert check.status == status and says in check.detail, check.line()
