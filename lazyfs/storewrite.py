"""Writing a request's bytes into its download's sparse file.

Two ways (`--store-writes`):

- direct (the default) for a download nobody reads through lazyfs meanwhile
  (an open waiting for the whole file, a prefetch, a next shard fetched
  ahead): each piece goes to the disk with O_DIRECT, from a buffer the
  writing thread reuses, bypassing the page cache.  A buffered write first
  copies every byte into newly allocated page-cache memory, and on a VM
  that hands freed memory back to its host (free page reporting), the first
  write to such memory costs more than the transfer itself (~3 of the
  daemon's 12 CPU s of a 2.1 GiB cold model load here, docs/bench-after.md).
  A file checked by its MD5 ETag is read back to verify it, the same way
  around the page cache (readback.py); one checked by a CRC is not read
  back at all (piecesums.py).  Either way the loader's faults read it from
  the disk, into the page cache once.
  While a handle reads the file as it fills, its pieces are written
  buffered: lazyfs answers those reads from the page cache, and bytes
  written direct would have to come back from the disk first (measured:
  a cold sequential read through lazyfs at 271 MB/s instead of 404).
- buffered: plain pwrite, always.  Better when the store's disk is much
  slower than the network, since a direct write makes verification read
  the bytes back from the disk instead of from memory.

A piece goes direct only when its offset and length are multiples of
`ALIGN` (every piece of the sweep is, except a file's tail); anything else,
and every piece on a filesystem that refuses O_DIRECT (tmpfs before 6.6,
some network and FUSE filesystems), is written buffered.  The kernel keeps
the two coherent: a direct write drops the cached pages of its range.

Each piece's CRCs are summed here too, when the download is checked against
a CRC (piecesums.py): the bytes are in hand, and the file need not be read
back to verify it.

Writers of one file take turns (WriteTurns): a buffered write takes the
file's lock, since concurrent buffered writes to one file contend for its
inode lock in the kernel, which spins and burns the CPU the download needs
(a Python lock makes the losers sleep instead).  So does a direct write
into a sparse file, whose every piece allocates blocks under that same lock.
A direct write into a preallocated file (`preallocate`) takes the kernel's
lock shared and goes side by side with the others: it waits only for
writers of the same bytes, through a lock per 1 MiB stripe, so the sums
kept for those bytes stay the last write's.  Without that, every writer
waited on the one holding the file's lock, which after its `pwrite` waits
for the GIL before it can let go.  Both halves are needed: side by side
into a sparse file the kernel spins (f8aeb56), and preallocation under one
lock per file gained nothing measurable; together they took 2-19% off the
cold model loads (docs/bench-after.md, "Download files preallocated").
Every download file is preallocated, small ones too (one request writes
them, so nothing to keep apart): their room is then taken before a byte is
fetched, and downloads admitted together cannot overrun the store
(storeroom.py).

Runs in worker threads (the boto3 requests' threads, awscrt's callback
threads); each thread has its own aligned buffer.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import threading
from typing import Callable, Sequence

from lazyfs.errors import StoreError
from lazyfs.namespace import RemoteObject
from lazyfs.piecesums import PieceSums
from lazyfs.stats import STATS
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

# Offsets, lengths and buffers of direct writes: a page, which every block
# device's logical block size divides (512 B or 4 KiB).
ALIGN = 4096
# A thread's buffer grows in these steps up to the largest piece it wrote
# (boto3's pieces are 256 KiB; awscrt's chunks vary).
_BUFFER_STEP = 256 * 1024
# Errors that say "not this way" rather than "the disk failed": the piece is
# written buffered instead, and so is the rest of the request.
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)

# Writers of the same bytes take turns by stripe (a lock per stripe, hashed).
_STRIPE = 1024 * 1024
_STRIPES = 64
# fallocate(2)'s modes that give a range's blocks back (linux/falloc.h).
_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02

_buffers = threading.local()
# Said once per process at INFO, the first time direct writes are refused:
# from then on every download writes through the page cache, and an operator
# who chose `direct` (the default) should learn why its counter stays at 0.
_refusal_told = threading.Event()


class WriterClosed(Exception):
    """A piece arrived after its request ended (an abandoned awscrt request's
    late callback): it is dropped, never written to a descriptor that may
    name another file by now."""


def preallocate(fd: int, size: int, gaps: Sequence[tuple[int, int]] | None = None) -> bool:
    """Allocate the blocks of a download file of `size` bytes up front
    (fallocate(2), reading as zeros where nothing was written; the bytes
    already there kept): its room is taken before a byte is fetched
    (storeroom.py), and its direct writes need not take turns (module
    docstring).  The file stays sparse where the filesystem refuses
    (EOPNOTSUPP); where it has no room, ENOSPC is raised and whatever blocks
    it took given back: a new file left empty, a resumed one's `gaps` (the
    byte ranges (offset, length) it has not got) punched out again, its
    bytes kept.  Never glibc's posix_fallocate, which writes a byte per
    block where the filesystem cannot allocate."""
    fallocate = _fallocate()
    if size <= 0 or fallocate is None:
        return False
    if fallocate(fd, 0, 0, size) == 0:
        return True
    if (err := ctypes.get_errno()) == errno.ENOSPC:
        if gaps is None:
            os.ftruncate(fd, 0)
        for offset, length in gaps or ():
            fallocate(fd, _PUNCH_HOLE | _KEEP_SIZE, offset, length)  # a hole is never refused for want of room
        raise OSError(err, os.strerror(err))
    return False


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2), found once."""
    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fallocate is not None:
        fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return fallocate


class WriteTurns:
    """How the writers of one download file take turns (module docstring).
    `separate`: the file is preallocated, and direct writes of separate bytes
    may go at once."""

    def __init__(self, separate: bool = False) -> None:
        self._file = threading.Lock()
        self._stripes = tuple(threading.Lock() for _ in range(_STRIPES)) if separate else ()

    def locks(self, offset: int, length: int, direct: bool) -> list[threading.Lock]:
        """The locks a write of [offset, offset + length) holds, in the one
        order every writer takes them (the file's, then stripes ascending)."""
        if not self._stripes:
            return [self._file]
        first, last = offset // _STRIPE, (offset + max(length, 1) - 1) // _STRIPE
        stripes = [self._stripes[i] for i in sorted({i % _STRIPES for i in range(first, last + 1)})]
        return stripes if direct else [self._file, *stripes]


class PieceWriter:
    """Writes one request's pieces into `fd` (the download's read-write
    descriptor), direct when it can, taking turns with the file's other
    writers through `turns`.  Not shared between requests; close it when the
    request ends."""

    def __init__(self, fd: int, obj: RemoteObject, direct: Callable[[], bool], turns: WriteTurns,
                 sums: PieceSums | None = None) -> None:
        self.fd = fd
        self.obj = obj
        self._direct = direct  # asked per piece: may this one go direct?
        self._turns = turns
        self._busy = threading.Lock()  # held through a write: close() waits for it
        self._sums = sums  # each piece's CRCs, kept once it is written (piecesums.py)
        self._closed = False
        self._direct_fd: int | None = None  # opened at the first direct piece; -1: refused

    def write(self, data: bytes | memoryview, offset: int) -> None:
        """All of `data` at `offset`.  A failure is the store's (ENOSPC, EIO),
        and says so (StoreError); WriterClosed after `close`."""
        view = memoryview(data)
        summed = self._sums.summed(offset, view) if self._sums is not None else None
        with self._busy:
            if self._closed:
                raise WriterClosed()
            # A writer whose filesystem refused O_DIRECT writes buffered, and takes turns as such.
            direct = (offset % ALIGN == 0 and len(view) % ALIGN == 0 and bool(view) and self._direct_fd != -1
                      and self._direct())
            held = self._turns.locks(offset, len(view), direct)
            for lock in held:
                lock.acquire()
            try:
                at = offset
                if direct:
                    view, at = self._write_direct(view, offset)
                while view:
                    n = os.pwrite(self.fd, view, at)
                    view = view[n:]
                    at += n
                if self._sums is not None:
                    self._sums.record(summed)  # in turn: the sums kept are of the last bytes written
            except OSError as e:
                raise StoreError(f"{quoted(self.obj.uri)}: cannot write it to the store: {e.strerror}",
                                 e.errno or errno.EIO) from e
            finally:
                for lock in reversed(held):
                    lock.release()

    def _write_direct(self, view: memoryview, offset: int) -> tuple[memoryview, int]:
        """Write what can go direct; return what is left for a buffered write."""
        if self._direct_fd is None:
            self._direct_fd = _reopen_direct(self.fd)
        if self._direct_fd < 0:
            return view, offset
        done = 0
        with memoryview(_buffer(len(view))) as buf:
            buf[:len(view)] = view
            try:
                while done < len(view):
                    n = os.pwrite(self._direct_fd, buf[done:len(view)], offset + done)
                    done += n
                    if n == 0 or done % ALIGN:
                        break  # a short write leaves the rest unaligned: buffered
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                _refused(f"{quoted(self.obj.uri)}: {e.strerror}")
                os.close(self._direct_fd)
                self._direct_fd = -1
        STATS.bump("direct_bytes", n=done)
        return view[done:], offset + done

    def close(self) -> None:
        with self._busy:
            self._closed = True
            if self._direct_fd is not None and self._direct_fd >= 0:
                os.close(self._direct_fd)
                self._direct_fd = -1

    def __enter__(self) -> PieceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reopen_direct(fd: int) -> int:
    """A second, O_DIRECT descriptor of `fd`'s file (through /proc, so it
    works for a file unlinked meanwhile), or -1 where direct I/O is refused."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        _refused(f"/proc/self/fd: {e.strerror}")
        return -1


def _refused(why: str) -> None:
    if _refusal_told.is_set():
        log.debug("direct writes refused (%s)", why)
        return
    _refusal_told.set()
    log.info("downloaded bytes go to the store through the page cache: direct writes are refused (%s); "
             "they need a filesystem that takes O_DIRECT and /proc mounted", why)


def _buffer(size: int) -> mmap.mmap:
    """This thread's aligned buffer, at least `size` bytes.  An anonymous
    mapping is page-aligned, and reused it stays touched memory."""
    buf: mmap.mmap | None = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = mmap.mmap(-1, -(-size // _BUFFER_STEP) * _BUFFER_STEP)
        _buffers.buf = buf
    return buf
