"""Warm-up: fetch every file (or the files matching patterns) in the background,
at the full parallel rate, while opens are served from the bytes arriving.

Downloads started here are "background" for the engine's scheduler, so a file
someone is reading always goes first.  At most `concurrent_files` downloads
are started at once: each holds a descriptor and a mapping, and ten thousand
small files must not exhaust either.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import trio

from lazyfs import wording
from lazyfs.completion import UNVERIFIED
from lazyfs.config import Source
from lazyfs.download import Download
from lazyfs.errors import LazyfsError, StoreError, again
from lazyfs.fetch import Fetcher
from lazyfs.filestate import FileState
from lazyfs.namespace import RemoteObject
from lazyfs.store import LocalCopy
from lazyfs.threads import run_sync
from lazyfs.transfer import Transfer

log = logging.getLogger(__name__)


def matcher(patterns: Sequence[str], sources: Sequence[Source]) -> Callable[[RemoteObject], bool]:
    """A predicate for objects: patterns with a '/' match the path below the
    configured folder, patterns without one match the file name anywhere."""

    def relative(obj: RemoteObject) -> str:
        for s in sources:
            if s.bucket == obj.bucket and obj.key.startswith(s.prefix):
                return obj.key[len(s.prefix):]
        return obj.key

    def match(obj: RemoteObject) -> bool:
        if not patterns:
            return True
        rel = relative(obj)
        return any(fnmatch.fnmatchcase(rel if "/" in p else obj.name, p) for p in patterns)

    return match


@dataclass
class Progress:
    files: int = 0
    bytes: int = 0
    done_files: int = 0
    done_bytes: int = 0
    local_files: int = 0
    local_bytes: int = 0  # of done_bytes, those of the local files (bake's "downloaded" are the rest)
    linked_files: int = 0  # of the local ones, linked just now from the same bytes under another path
    skipped_files: int = 0  # larger than the cache budget
    crowded_files: int = 0  # not fetched: the budget is full of files fetched ahead and not opened yet
    unverified_files: int = 0  # downloaded, their content checked against nothing (completion.UNVERIFIED)
    failed: list[tuple[str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


class Prefetcher:
    def __init__(self, fetcher: Fetcher, concurrent_files: int = 32, must_keep: bool = False,
                 on_local: Callable[[LocalCopy], None] | None = None) -> None:
        self.fetcher = fetcher
        self.concurrent_files = concurrent_files
        # `lazyfs bake`: a file fetched but not kept in the store (a folder
        # in its way stays: stalefolder.py) counts as failed, not done.
        self.must_keep = must_keep
        # `lazyfs bake`: what becomes of a copy found current (it gets the
        # bake's file mode); blocking, run in a thread; a LazyfsError fails the file.
        self.on_local = on_local
        self.progress = Progress()

    async def run(self, objects: Iterable[RemoteObject]) -> Progress:
        """Fetch `objects` that have no current local copy; return when all are done."""
        todo = sorted(objects, key=lambda o: o.key)
        p = self.progress = Progress(files=len(todo), bytes=sum(o.size for o in todo))
        slots = trio.Semaphore(self.concurrent_files)
        async with trio.open_nursery() as nursery:
            for obj in todo:
                await slots.acquire()
                nursery.start_soon(self._one, obj, slots)
        return p

    async def _one(self, obj: RemoteObject, slots: trio.Semaphore) -> None:
        p = self.progress
        budget = self.fetcher.budget
        if budget is not None and not budget.fits(obj):
            # It would be downloaded whole and thrown away: only a reader may stream it.
            log.warning("prefetch: skipping %s (%.1f MiB): larger than the cache budget", wording.quoted(obj.uri),
                        obj.size / 2**20)
            p.skipped_files += 1
            slots.release()
            return
        got: LocalCopy | Transfer | None = None
        try:
            # Wait while the downloads in flight fill the budget (reserve
            # alone never waits, for the readers' sake): a prefetch of a tree
            # larger than the budget keeps at most the budget on disk, the
            # files it fetched first, and leaves the rest to the readers.
            if budget is not None and not await budget.wait_for_room(obj):
                if not p.crowded_files:
                    log.info("prefetch: the cache budget is full of files fetched ahead that nobody has opened "
                             "yet; %s and the files after it are left to the readers", wording.quoted(obj.uri))
                p.crowded_files += 1
                return
            try:
                got = await self.fetcher.acquire(obj, background=True)
            finally:
                if budget is not None:
                    budget.unhold(obj)  # a download started reserved its own room
            if isinstance(got, LocalCopy):
                try:
                    if self.must_keep and got.state is FileState.CACHED:  # a bake's: a file a mount fetched
                        await run_sync(self._claim, got.fd)  # is baked now, never evicted
                    if self.on_local is not None:
                        await run_sync(self.on_local, got)
                finally:
                    os.close(got.fd)
                p.local_files += 1
                p.local_bytes += obj.size
                p.linked_files += int(got.linked)
            else:
                await self._wait(got)
                if self.must_keep and isinstance(got, Download) and got.complete and not got.keep:
                    raise StoreError(f"{wording.quoted(obj.uri)}: not kept in the store (its log says why)")
                p.unverified_files += int(isinstance(got, Download) and got.verified == UNVERIFIED)
            p.done_files += 1
            p.done_bytes += obj.size
        except LazyfsError as e:
            p.failed.append((obj.uri, str(e)))
        except Exception as e:  # the store failed in a way nobody foresaw: count it, go on
            log.error("prefetch of %s failed unexpectedly", wording.quoted(obj.uri), exc_info=e)
            p.failed.append((obj.uri, f"{type(e).__name__}: {e}"))
        finally:
            kept = isinstance(got, Download) and got.complete and got.keep  # `published` frees its room
            if budget is not None and not kept and self.fetcher.active(obj) is None:
                # Over, and nothing kept (found local, failed to start, or a
                # newer version was in the store already): a room still
                # reserved for it would shrink the budget for good.
                budget.released(obj)
            slots.release()

    def _claim(self, fd: int) -> None:
        """Blocking: a copy a mount fetched, found current by a bake, is
        recorded as the bake's, which no cache budget evicts (README)."""
        try:
            self.fetcher.store.identities.claim(fd, self.fetcher.runner.origin)
        except OSError as e:
            log.warning("a copy already in the store stays recorded as fetched (%s): a mount's cache budget may "
                        "evict it", e.strerror)

    @staticmethod
    async def _wait(dl: Transfer) -> None:
        await dl.finished.wait()
        if dl.error is not None:
            raise again(dl.error) if isinstance(dl.error, LazyfsError) else LazyfsError(str(dl.error))


def summary(p: Progress) -> str:
    secs = max(time.monotonic() - p.started, 1e-6)
    fetched = p.done_bytes
    return (f"{p.done_files} of {wording.count(p.files, 'file')} ({fetched / 2**30:.2f} of {p.bytes / 2**30:.2f} GiB) "
            f"in {secs:.1f} s ({fetched / secs / 1e6:.0f} MB/s), {p.local_files} already local, "
            f"{len(p.failed)} failed" + (f", {p.skipped_files} too large for the cache budget"
                                         if p.skipped_files else "")
            + (f", {p.crowded_files} left to the readers (the cache budget is full)" if p.crowded_files else ""))
