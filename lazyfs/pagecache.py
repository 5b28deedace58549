"""Bringing file pages into the page cache off the trio thread.

pyfuse3 replies to a read with the buffer the handler returns, in the trio
thread (holding the GIL, except in the build scripts/native/build-pyfuse3
makes).  A reply from a mapping of a file whose pages are not cached (every
file after a restart, blocks resumed from an earlier run) faults them in from
disk inside that call: one synchronous disk read at a time, with every other
request of the process waiting.  So before
a reply, the chunks it covers that are not known to be cached are read into
the page cache by worker threads (sendfile to /dev/null: no copy into
Python, the GIL released), several at once, and the chunks after them are
read ahead in the background.  The reply then copies from cached pages.
"""

from __future__ import annotations

import logging
import os
from typing import Awaitable, Callable

import trio

from lazyfs import readback
from lazyfs.filemap import CHUNK, FileMap
from lazyfs.threads import run_sync

log = logging.getLogger(__name__)

# Threads reading store files into the page cache (NVMe disks want several
# requests in flight to reach their speed): for chunks a reply waits for, and
# (fewer) for reading ahead, so a reply never queues behind read-ahead.
THREADS = 8
AHEAD_THREADS = 4
# Chunks read ahead of a cold read that continues a sequential walk (in the
# background), so a loader walking a file finds the next tensors cached.
READ_AHEAD_CHUNKS = 16


class Prefaulter:
    def __init__(self, spawn: Callable[..., None], close: Callable[[int], None] = os.close) -> None:
        self._spawn = spawn  # start a supervised background task
        # Closes our descriptors (Fetcher.close_fd): ours may be the last of a
        # file unlinked meanwhile (evicted, replaced, a discarded download),
        # whose close frees its blocks and must not run on the trio thread.
        self._close = close
        self._threads = trio.CapacityLimiter(THREADS)
        self._ahead_threads = trio.CapacityLimiter(AHEAD_THREADS)
        self._nowait = True  # until the store's filesystem cannot say what is cached
        self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        # (mapping, chunk) -> done: a chunk is read by one thread, whoever asks.
        self._pending: dict[tuple[int, int], trio.Event] = {}

    def close(self) -> None:
        os.close(self._devnull)

    async def ensure(self, fmap: FileMap, off: int, size: int) -> None:
        """Return once bytes [off, off + size) of `fmap` are in the page cache."""
        cold = fmap.cold_chunks(off, size)
        if not cold:
            return
        cold = self._not_cached(fmap, cold)
        if not cold:
            return
        # Read ahead only for a walk (the chunk before is warm, or this is the
        # start): ahead of random reads it would only keep the disk busy.
        walking = cold.start == 0 or fmap.is_warm(cold.start - 1)
        ahead = range(cold.stop, min(cold.stop + READ_AHEAD_CHUNKS, -(-fmap.size // CHUNK)))
        await self._read(fmap, cold, self._threads)
        if walking and ahead and fmap.cold_chunks(ahead.start * CHUNK, len(ahead) * CHUNK):
            self._spawn(self._read, fmap, fmap.cold_chunks(ahead.start * CHUNK, len(ahead) * CHUNK),
                        self._ahead_threads)

    def _not_cached(self, fmap: FileMap, chunks: range) -> range:
        """`chunks` less those the page cache holds already (a file read since
        it was written, or by another process): asking costs a system call
        of a few microseconds, where reading them in costs a thread's round
        trip (residency.py: a count that reads nothing in)."""
        if not self._nowait:
            return chunks
        for i in chunks:
            cached = readback.in_page_cache(fmap.fd, i * CHUNK, min(fmap.size, (i + 1) * CHUNK))
            if cached is None:
                self._nowait = False  # the store's filesystem cannot say: read everything in
                return chunks
            if cached:  # (else a thread reads it in)
                fmap.mark_chunks_warm(range(i, i + 1))
        return fmap.cold_chunks(chunks.start * CHUNK, len(chunks) * CHUNK)

    async def _read(self, fmap: FileMap, chunks: range, threads: trio.CapacityLimiter) -> None:
        waits: list[trio.Event] = []
        mine: list[int] = []
        for i in chunks:
            pending = self._pending.get((id(fmap), i))
            if pending is not None:
                waits.append(pending)
            else:
                self._pending[(id(fmap), i)] = trio.Event()
                mine.append(i)
        try:
            if mine:
                # Our own descriptor: the owner may close its own meanwhile.
                fd = os.dup(fmap.fd)
                try:
                    await run_sync(self._read_blocking, fd, mine[0] * CHUNK, (mine[-1] + 1) * CHUNK, limiter=threads)
                finally:
                    self._close(fd)
                fmap.mark_chunks_warm(range(mine[0], mine[-1] + 1))
        finally:
            for i in mine:
                self._pending.pop((id(fmap), i)).set()
        for event in waits:
            await event.wait()

    def _read_blocking(self, fd: int, start: int, end: int) -> None:
        pos = start
        while pos < end:
            try:
                n = os.sendfile(self._devnull, fd, pos, end - pos)
            except OSError as e:  # the reply will fault it in: slower, still right
                log.debug("reading ahead into the page cache: %s", e)
                return
            if n == 0:
                return
            pos += n


Ensure = Callable[[FileMap, int, int], Awaitable[None]]
