"""Reading a store file's bytes back to hash them: from the page cache what
it holds, the rest straight from the disk.

A download's pieces go to the disk with O_DIRECT (storewrite.py), so a file
checked by its MD5 ETag (or a part no piece's CRC covers) is read back from
the disk.  Read through the page cache, every byte was copied from newly
filled cache pages into our buffer: 4.8 of the daemon's 12.2 CPU s of a cold
2.05 GiB model load with only MD5 ETags (perf, `_copy_to_iter` under
`preadv`), on 2 CPUs the loader and the S3 server need too.  Read with
O_DIRECT, the disk's DMA fills our own reused buffer and the CPU only hashes
(docs/bench-after.md, "Hashing what the page cache does not hold").  The
loader's reads then fill the page cache once, as they do for a file checked
by a CRC, which is never read back.

What the page cache holds (pieces written buffered because a reader reads the
file as it fills, `--store-writes buffered`, a file read since) is read from
it: a copy from cached pages costs less than a disk read.  Asked per
chunk, as pagecache.py asks (residency.py; where that falls back to reads
with RWF_NOWAIT, through a descriptor with read-ahead off: _twins says why).

Where O_DIRECT is refused (tmpfs before 6.6, some network filesystems) or the
kernel cannot say what is cached, everything goes through the page cache.

Blocking: run in worker threads.  Each hash takes a buffer of its own from a
pool (not per thread: trio's cached threads would each keep one).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from typing import Any, Callable, Iterator

from lazyfs import residency
from lazyfs.errors import IntegrityError
from lazyfs.stats import STATS

# Bytes hashed per read.  The buffers are reused from hash to hash: a fresh
# one per read would be fresh pages, a page fault and a zeroed page per 4 KiB
# (about a sixth of the daemon's CPU on a cold load before they were kept).
CHUNK = 1024 * 1024
# O_DIRECT wants offsets, lengths and buffers aligned to the disk's logical
# block; a page covers every common one (and mmap'd buffers are page-aligned).
ALIGN = 4096
_spare: list[memoryview] = []  # at most one per hash that ever ran at the same time
_spare_lock = threading.Lock()
_refused = threading.Event()  # a direct read failed as unsupported: the store's filesystem takes none


def read_into(fd: int, start: int, end: int, h: Any, cancelled: Callable[[], bool]) -> None:
    """Update hasher `h` (anything with `update(buffer)`) with bytes
    [start, end) of the file (counted: the bytes verification cost a pass
    over the file).  IntegrityError when the file ends before `end`."""
    STATS.bump("verify_read_bytes", n=end - start)
    with _buffer() as buf, _twins(fd) as (twin_fd, probe_fd):
        direct_fd, pos = twin_fd, start
        while pos < end:
            if cancelled():
                raise InterruptedError("verification cancelled")
            skip = pos % ALIGN  # a direct read starts at the block `pos` is in
            want = min(CHUNK - skip, end - pos)
            got = -1
            if direct_fd >= 0 and in_page_cache(probe_fd, pos, pos + want) is False:
                got = _read_direct(direct_fd, buf, pos - skip, skip + want)
                if got < 0:
                    direct_fd = -1  # refused: the rest of this file goes through the page cache too
            if got >= 0:
                view = buf[skip:max(skip, got)]
            else:
                view = buf[:os.preadv(fd, [buf[:want]], pos)]
            if not view:
                raise IntegrityError(f"file ended at {pos} bytes, expected {end}")
            h.update(view)
            pos += len(view)


def _read_direct(direct_fd: int, buf: memoryview, pos: int, want: int) -> int:
    """Up to `want` bytes at `pos` with O_DIRECT, rounded up to whole blocks
    (at the end of the file the read returns less); -1 when the filesystem
    took the O_DIRECT open but refuses the read (it is not asked again)."""
    try:
        return min(want, os.preadv(direct_fd, [buf[:-(-want // ALIGN) * ALIGN]], pos))
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        _refused.set()
        return -1


def in_page_cache(fd: int, start: int, end: int) -> bool | None:
    """Whether the pages of bytes [start, end) are cached (None: the kernel
    or filesystem cannot say)."""
    return residency.cached(fd, start, end)


@contextlib.contextmanager
def _twins(fd: int) -> Iterator[tuple[int, int]]:
    """Two more descriptors of `fd`'s file (through /proc, so it works for a
    file unlinked meanwhile): one O_DIRECT, and one to ask what is cached
    through, with the kernel's read-ahead off.  A one-byte RWF_NOWAIT read
    of a page not cached reads that page in (it fails without waiting for
    it), and probes of a chunk's last page then the next one's first look
    like a sequential read: through `fd` they started read-ahead windows of
    the disk's read_ahead_kb (8 MiB here), which filled the page cache with
    what the direct reads were meant to keep out of it.  (-1, -1) where
    direct reads are refused."""
    if _refused.is_set():
        yield -1, -1
        return
    opened: list[int] = []
    try:
        for flags in (os.O_RDONLY | os.O_DIRECT, os.O_RDONLY):
            opened.append(os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC))
        os.posix_fadvise(opened[1], 0, 0, os.POSIX_FADV_RANDOM)
    except OSError:
        for twin in opened:
            os.close(twin)
        yield -1, -1
        return
    try:
        yield opened[0], opened[1]
    finally:
        for twin in opened:
            os.close(twin)


@contextlib.contextmanager
def _buffer() -> Iterator[memoryview]:
    """A page-aligned read buffer of CHUNK bytes, a spare one if there is one."""
    with _spare_lock:
        buf = _spare.pop() if _spare else memoryview(mmap.mmap(-1, CHUNK))
    try:
        yield buf
    finally:
        with _spare_lock:
            _spare.append(buf)
