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
chunk, as pagecache.py asks: a one-byte read of its first and last pages
with RWF_NOWAIT, which fails rather than wait for the disk.

Where O_DIRECT is refused (tmpfs before 6.6, some network filesystems) or the
kernel cannot say what is cached, everything goes through the page cache.

Blocking: run in worker threads.  Each hash takes a buffer of its own from a
pool (not per thread: trio's cached threads would each keep one).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from typing import Any, Callable, Iterator

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


def read_into(fd: int, start: int, end: int, h: Any, cancelled: Callable[[], bool]) -> None:
    """Update hasher `h` (anything with `update(buffer)`) with bytes
    [start, end) of the file (counted: the bytes verification cost a pass
    over the file).  IntegrityError when the file ends before `end`."""
    STATS.bump("verify_read_bytes", n=end - start)
    with _buffer() as buf, _direct_twin(fd) as direct_fd:
        pos = start
        while pos < end:
            if cancelled():
                raise InterruptedError("verification cancelled")
            want = min(CHUNK, end - pos)
            if direct_fd >= 0 and pos % ALIGN == 0 and in_page_cache(fd, pos, pos + want) is False:
                # Rounded up to whole blocks: at the end of the file the read returns less.
                n = min(want, os.preadv(direct_fd, [buf[:-(-want // ALIGN) * ALIGN]], pos))
            else:
                n = os.preadv(fd, [buf[:want]], pos)
            if not n:
                raise IntegrityError(f"file ended at {pos} bytes, expected {end}")
            h.update(buf[:n])
            pos += n


def in_page_cache(fd: int, start: int, end: int) -> bool | None:
    """Whether the pages of bytes [start, end) are cached, judged by the
    first and last (None: the kernel or filesystem cannot say)."""
    probe = bytearray(1)
    try:
        return bool(os.preadv(fd, [probe], start, os.RWF_NOWAIT)) and \
            bool(os.preadv(fd, [probe], end - 1, os.RWF_NOWAIT))
    except BlockingIOError:
        return False
    except (OSError, AttributeError):  # (RWF_NOWAIT: Linux 4.14 and up)
        return None


@contextlib.contextmanager
def _direct_twin(fd: int) -> Iterator[int]:
    """A second, O_DIRECT descriptor of `fd`'s file (through /proc, so it
    works for a file unlinked meanwhile), or -1 where direct reads are refused."""
    try:
        direct_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        yield -1
        return
    try:
        yield direct_fd
    finally:
        os.close(direct_fd)


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
