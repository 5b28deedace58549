"""Whether the page cache holds a range of a file, asked without changing it.

cachestat(2) (Linux 6.5 and up) counts the cached pages of a range in one
system call and reads nothing in.  Where it is missing, or refused (recent
kernels, 6.18 here, refuse it for a file the process neither owns nor may
write: it would tell what others read), a one-byte read of the range's first and last pages
with RWF_NOWAIT is asked instead.  That read fails rather than wait for the
disk, but it starts reading the page in, and on a fast disk the page can be
there before the call returns: an uncached range then passes for a cached
one.  Under a writeback load here, one chunk in four of a file just dropped
from the page cache did, and was read through the page cache it was meant to
stay out of (tests/unit/test_residency.py).

Non-blocking either way: both calls return without waiting for the disk, so
they may run on the trio thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

_CACHESTAT = 451  # the same number on every architecture (the unified syscall table)
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64)
                for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_syscall = ctypes.CDLL(None, use_errno=True).syscall
_missing = threading.Event()  # the kernel has no cachestat: never asked again


def cached(fd: int, start: int, end: int) -> bool | None:
    """Whether every page of bytes [start, end) of `fd`'s file is cached
    (None: neither way of asking works on this file's filesystem)."""
    if end <= start:
        return True
    counted = _cachestat(fd, start, end)
    if counted is None:
        return _nowait_probe(fd, start, end)
    if counted < -(-end // _PAGE) - start // _PAGE:
        return False
    # Every page is there, but a page the kernel is still reading in counts
    # too: its first and last pages must read without waiting (being there,
    # they start no disk read when asked).
    return _nowait_probe(fd, start, end) is not False


def _cachestat(fd: int, start: int, end: int) -> int | None:
    """How many pages of the range the page cache holds; None where cachestat
    cannot say for this file."""
    if _missing.is_set():
        return None
    first = start // _PAGE * _PAGE
    span, stat = _Range(first, end - first), _Stat()
    if _syscall(ctypes.c_long(_CACHESTAT), ctypes.c_int(fd), ctypes.byref(span), ctypes.byref(stat),
                ctypes.c_uint(0)) == 0:
        return int(stat.nr_cache)
    if ctypes.get_errno() == errno.ENOSYS:
        _missing.set()
    return None  # (EPERM: not ours to ask about; EBADF and the like: let the probe say)


def _nowait_probe(fd: int, start: int, end: int) -> bool | None:
    """The first and last pages, by one-byte RWF_NOWAIT reads (see above: a
    page being read in may pass for cached)."""
    probe = bytearray(1)
    try:
        return bool(os.preadv(fd, [probe], start, os.RWF_NOWAIT)) and \
            bool(os.preadv(fd, [probe], end - 1, os.RWF_NOWAIT))
    except BlockingIOError:
        return False
    except (OSError, AttributeError):  # (RWF_NOWAIT: Linux 4.14 and up)
        return None
