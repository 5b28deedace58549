"""End to end: a reader killed while it waits for a download dies at once;
a signal it handles changes nothing (lazyfs/killwatch.py).

The kernel sends FUSE_INTERRUPT for a request the daemon has read when its
caller gets any signal, and after a fatal one waits for the answer
uninterruptibly: a reader SIGKILLed in a cold read stayed in D state until
lazyfs answered (the whole --read-deadline), an open waiting for the whole
file until the file was in.  Needs the pyfuse3 of scripts/native/build-pyfuse3.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.mounting import FS, Mounted, wait_until
from support.proxy import Fault

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def interrupts_ok() -> None:
    """Skips where pyfuse3 does not hand the kernel's interrupts over (lazyfs
    then ignores them, as it always did); CI's setup builds the one that does."""
    import pyfuse3

    if getattr(pyfuse3, "INTERRUPTED_HOOK", False):
        return
    if os.environ.get("CI"):
        pytest.fail("CI must run with the pyfuse3 of scripts/native/build-pyfuse3 (scripts/setup builds it)")
    pytest.skip("this pyfuse3 does not hand the kernel's interrupts over")


P = "models/m"
# A handle of a file this big reads it as it downloads with direct_io
# (fuse_ops.DIRECT_IO_FROM): each read is a request the reader waits in.  A
# smaller file's reads are the kernel's readahead, requests of its own that a
# killed reader does not wait for.
BIG = 64 << 20
DEADLINE = 30  # --read-deadline: a killed reader's wait must end long before it
STALL_S = 15  # the object's first GET holds its body this long, then breaks off
REAPED_S = 8  # a killed reader is gone within this (it took STALL_S or DEADLINE)

# A reader: opens the file, says so, then one pread through libc (Python's own
# os.pread retries on EINTR, PEP 475, and would hide it): "<n> <errno> <sha256>".
# With --handle SIGUSR1, a handler that does nothing.
READER = r"""
import ctypes, hashlib, os, signal, sys
path, size, handle = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "handle"
if handle:
    signal.signal(signal.SIGUSR1, lambda *a: None)
libc = ctypes.CDLL(None, use_errno=True)
libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
libc.pread.restype = ctypes.c_ssize_t
fd = os.open(path, os.O_RDONLY)
print("opened", flush=True)
buf = ctypes.create_string_buffer(size)
n = libc.pread(fd, buf, size, 0)
print(n, ctypes.get_errno(), hashlib.sha256(buf.raw[:max(n, 0)]).hexdigest(), flush=True)
"""

OPENER = "import os, sys; os.open(sys.argv[1], os.O_RDONLY); print('opened', flush=True)"


KEY = f"{P}/w.bin"


def _stalled_mount(mount, proxy, s3, bucket, *flags: str, size: int = BIG) -> tuple[Mounted, Path, bytes]:
    data = os.urandom(size)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    proxy.add(Fault("stall", key=KEY, after=0, seconds=STALL_S, times=1))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--read-deadline", str(DEADLINE), "--read-timeout", "60", *flags)
    return m, m.file(KEY), data


def _waiting_in(pid: int, syscall: int) -> bool:
    """Is process `pid` blocked in system call number `syscall`?"""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == str(syscall)
    except (OSError, IndexError):
        return False


def _blocked(child: subprocess.Popen[str], syscall: int, proxy) -> None:
    """Wait until `child` waits in `syscall` on the stalled GET, its request read by the daemon."""
    wait_until(lambda: proxy.requests("GET", KEY), what="the object's GET")
    wait_until(lambda: _waiting_in(child.pid, syscall), what="the child to block")
    time.sleep(1.0)  # the kernel's request is read by the daemon within milliseconds
    assert child.poll() is None, "the child did not wait: nothing to interrupt"


def _killed_is_reaped(child: subprocess.Popen[str]) -> float:
    started = time.monotonic()
    child.kill()
    try:
        child.wait(timeout=REAPED_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a reader SIGKILLed while it waited was still there after {REAPED_S} s "
                    f"(--read-deadline {DEADLINE}, the stall {STALL_S} s)")
    return time.monotonic() - started


def _end(child: subprocess.Popen[str]) -> None:
    child.kill()
    try:
        child.wait(timeout=DEADLINE + STALL_S)  # a child the daemon never answers dies with the mount
    finally:
        if child.stdout is not None:
            child.stdout.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_reader_killed_in_a_cold_read_dies_at_once(mount, proxy, s3, bucket, fs: FS):
    m, path, data = _stalled_mount(mount, proxy, s3, bucket, "--whole-file-open", "never")
    child = subprocess.Popen([sys.executable, "-c", READER, str(path), str(1 << 20), "plain"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert fs.run(child.stdout.readline).strip() == "opened"  # type: ignore[union-attr]
        _blocked(child, 17, proxy)  # pread64
        _killed_is_reaped(child)
    finally:
        _end(child)
    wait_until(lambda: "is being killed" in m.log(), what="the killed reader's line")
    assert fs.read(path, timeout=60) == data, "another reader gets the bytes once the stall ends"
    assert "no data for bytes" not in m.log(), "an error was logged for a reader that was gone"


def test_an_open_waiting_for_the_whole_file_dies_at_once_when_killed(mount, proxy, s3, bucket, fs: FS):
    m, path, data = _stalled_mount(mount, proxy, s3, bucket, "--whole-file-open", "always", size=4 << 20)
    child = subprocess.Popen([sys.executable, "-c", OPENER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "the open waits for all" in m.log(), what="the open to wait for the whole file")
        _blocked(child, 257, proxy)  # openat
        _killed_is_reaped(child)
    finally:
        _end(child)
    wait_until(lambda: "is being killed" in m.log(), what="the killed opener's line")
    assert fs.read(path, timeout=60) == data, "the next open gets the whole file once the stall ends"
    assert "no data for bytes" not in m.log()


def test_a_handled_signal_does_not_interrupt_a_read_but_a_kill_after_it_does(mount, proxy, s3, bucket, fs: FS):
    """A read of a local file never fails with EINTR: a signal the reader
    handles (here SIGUSR1, three times) leaves its read waiting, and it gets
    the right bytes.  A SIGKILL after such a signal brings no second
    FUSE_INTERRUPT: it is seen all the same."""
    m, path, data = _stalled_mount(mount, proxy, s3, bucket, "--whole-file-open", "never")
    size = 1 << 20
    handled = subprocess.Popen([sys.executable, "-c", READER, str(path), str(size), "handle"],
                               stdout=subprocess.PIPE, text=True)
    killed = subprocess.Popen([sys.executable, "-c", READER, str(path), str(size), "handle"],
                              stdout=subprocess.PIPE, text=True)
    try:
        for child in (handled, killed):
            assert fs.run(child.stdout.readline).strip() == "opened"  # type: ignore[union-attr]
            _blocked(child, 17, proxy)
        for _ in range(3):
            handled.send_signal(signal.SIGUSR1)
            killed.send_signal(signal.SIGUSR1)
            time.sleep(0.3)
        assert handled.poll() is None and killed.poll() is None, "a handled signal ended a read"
        _killed_is_reaped(killed)
        out = fs.run(handled.stdout.readline, timeout=DEADLINE + STALL_S).split()  # type: ignore[union-attr]
        assert out == [str(size), "0", _sha(data[:size])], f"the read with a handled signal: {out}"
        assert handled.wait(timeout=10) == 0
    finally:
        for child in (handled, killed):
            _end(child)
    assert m.log().count("is being killed") == 1, "only the killed reader's request was ended"



# An O_DIRECT reader: a page-aligned buffer, one read at offset 0 (os.preadv: preadv2, syscall 327).
DIRECT_READER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
print("opened", flush=True)
print(os.preadv(fd, [mmap.mmap(-1, int(sys.argv[2]))], 0), flush=True)
"""
SMALL_DEADLINE = 5  # --read-deadline of the test below: the bound it shows


@pytest.mark.log_errors(r"no data for bytes")
def test_a_killed_o_direct_reader_of_a_small_file_is_reaped_by_the_read_deadline(mount, proxy, s3, bucket, fs: FS):
    """The kernel's limit, not lazyfs's (fs/fuse/file.c, fuse_direct_IO): an
    O_DIRECT read of a file served through the page cache (under 64 MiB, no
    direct_io) goes out as background requests (async_dio), which get no
    FUSE_INTERRUPT, and the reader waits for them uninterruptibly
    (wait_for_completion): SIGKILLed, it stays in D state until lazyfs answers,
    at the latest at --read-deadline (README, failure behaviour).  Measured on
    Linux 6.18: reaped only when the answer came."""
    data = os.urandom(8 << 20)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    proxy.add(Fault("stall", key=KEY, after=0, seconds=SMALL_DEADLINE + 15, times=1))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--read-deadline", str(SMALL_DEADLINE), "--read-timeout", "60",
              "--whole-file-open", "never")
    path = m.file(KEY)
    child = subprocess.Popen([sys.executable, "-c", DIRECT_READER, str(path), str(1 << 20)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert fs.run(child.stdout.readline).strip() == "opened"  # type: ignore[union-attr]
        _blocked(child, 327, proxy)  # preadv2
        started = time.monotonic()
        child.kill()
        try:
            child.wait(timeout=SMALL_DEADLINE + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a killed O_DIRECT reader was still there {SMALL_DEADLINE + 10} s after the kill "
                        f"(--read-deadline {SMALL_DEADLINE})")
        assert time.monotonic() - started < SMALL_DEADLINE + 10
    finally:
        _end(child)
    # (A read right after the deadline's failure fails at once too: the kernel's retry rule, README.)
    wait_until(lambda: "fetched " in m.log(), timeout=60, what="the download, once the stall ends")
    assert fs.read(path, timeout=60) == data, "the next reader gets the right bytes"
