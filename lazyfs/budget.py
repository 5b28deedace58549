"""The cache budget (`--cache-max-size`): fetched files are evicted, least
recently used first, when they would exceed it.

Only files lazyfs fetched (identity origin "fetch") count and can go; files
that were on disk before (prebaked into the image, baked by `lazyfs bake`,
checked with --verify etag) and the --prebaked layers are never touched.  A
file in use is never evicted: from the moment an open of it starts (an open
waiting for a whole file has no handle yet, and its file is published before
the open gets it) until its last handle is released (`use`, `unuse`).  A
file larger than the whole budget is still served: it streams through a
temporary file that is not kept, and a prefetch skips it.

A download holds its room from the moment it starts (`reserve` evicts for it
then), so downloads in flight count against the budget as much as files
kept.  A prefetch waits until the downloads in flight and the files in use
leave room for its file, and skips one that would fit only by evicting files
fetched ahead that nobody opened yet (`wait_for_room`); a reader never
waits, so a
reader's download may pass the budget when open files fill it, and its
publish evicts back under it; if the files in use still keep the store over the budget, the release of the
last handle of one of them evicts (`run`).  A download nobody waits for yet
(a shard fetched ahead of the loader) starts only if it fits beside the
files in use and the downloads in flight (`room_ahead`): evicting the shard
a loader reads, or the one fetched ahead before the loader opens it, would
make the loader download it twice.

Every fetched file in the store counts, however it got there: published by
a download (`published`), or linked from the same bytes under another path
or from a content-index entry whose path was just evicted (`linked`).

The files already in the store from earlier runs are found by a background
scan, so mounting never waits for it.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from typing import Awaitable, Callable

import trio

from lazyfs.errors import LazyfsError, NoThread
from lazyfs.filestate import FileState, LocalState
from lazyfs.namespace import RemoteObject, Version
from lazyfs.store import Store
from lazyfs.threads import run_sync
from lazyfs.wording import quoted, sizes

log = logging.getLogger(__name__)


class Budget:
    def __init__(self, store: Store, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.used = 0
        # key -> opens under way and handles of it: never evicted (`use`).
        self._users: Counter[str] = Counter()
        # Files fetched ahead of any reader (a prefetch, a next shard) and not
        # opened since: a prefetch never evicts them to make room for another
        # (it would throw away what it fetched for what it fetches next).
        self._unopened: set[str] = set()
        self._evict_soon = trio.Event()  # set when the store is over the budget and something may go (`run`)
        # Bytes promised to downloads in flight (by version), so thirty-two
        # prefetches starting together do not all count the same free room.
        self._reserved: dict[Version, int] = {}
        # Room held by prefetches between `wait_for_room` and their download's
        # `reserve` (or finding the file local): counted when deciding who
        # may start, never evicted for (a file found local needs no room).
        self._held: dict[Version, int] = {}
        self._room = trio.Event()  # set (and replaced) whenever room held in flight is given back
        # key -> the version `room_ahead` last said no to: a load asks for the
        # same next shard from several places (Fetcher.warm's callers), and
        # one line per file and load says why (a new one once a reader opens
        # it, or for another version).
        self._said_no_room: dict[str, Version] = {}
        self._said_too_large: set[Version] = set()  # (files larger than the budget, warned of)
        self.evicted_files = 0
        self.evicted_bytes = 0
        # key -> size of fetched files in the store, least recently used first.
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._lock = trio.Lock()

    async def run(self) -> None:
        """The budget's task: account for the files of earlier runs, then
        evict back within the budget whenever the store is over it and a
        file may go (its last user left, or a linked file was counted); an
        eviction unlinks in a worker thread."""
        await self.scan()
        while True:
            await self._evict_soon.wait()
            self._evict_soon = trio.Event()
            await self.make_room(0)

    async def scan(self) -> None:
        """Account for fetched files left by earlier runs (oldest access first)."""
        found = await run_sync(self.store.fetched_files)
        # Newest first: each goes to the front, so the oldest ends up first to go.
        for key, size, _atime in sorted(found, key=lambda f: f[2], reverse=True):
            if key not in self._lru:
                self._lru[key] = size
                self._lru.move_to_end(key, last=False)  # older than anything used since start
                self.used += size
        log.info("cache budget: %d fetched files, %.1f of %.1f MiB", len(self._lru),
                 self.used / 2**20, self.max_bytes / 2**20)
        await self.make_room(0)

    def touch(self, key: str) -> None:
        if key in self._lru:
            self._lru.move_to_end(key)

    def use(self, key: str) -> None:
        """An open of `key` starts: the file is not evicted until `unuse`,
        whether it is in the store, downloading, or about to be published
        for this open (a whole-file open waits for it with no handle yet)."""
        self._users[key] += 1
        self._unopened.discard(key)
        self._said_no_room.pop(key, None)
        self.touch(key)

    def unuse(self, key: str) -> None:
        """An open of `key` failed, or its handle was released.  If that was
        its last user and the store is over the budget (files in use held
        it there), the budget's task evicts now, not at the next publish."""
        self._users[key] -= 1
        if self._users[key] > 0:
            return
        del self._users[key]
        self._wake()  # a prefetch waiting for room beside the files in use looks again
        self._evict_if_over()

    def _evict_if_over(self) -> None:
        if self.used + self.reserved > self.max_bytes:
            self._evict_soon.set()

    def in_use(self, key: str) -> bool:
        return key in self._users

    def _taken_beside(self, obj: RemoteObject) -> tuple[int, int, int]:
        """Bytes of the files in use, of those fetched ahead and not opened
        yet, and of the downloads in flight, `obj`'s own left out (a reader
        may hold it open, or be downloading it)."""
        in_use = sum(self._lru.get(key, 0) for key in self._users if key != obj.key)
        unopened = sum(self._lru.get(key, 0) for key in self._unopened - self._users.keys() if key != obj.key)
        in_flight = sum(size for version, size in {**self._held, **self._reserved}.items() if version != obj.version)
        return in_use, unopened, in_flight

    def room_ahead(self, obj: RemoteObject, say: bool = True) -> bool:
        """May a download nobody waits for yet (a next shard, a companion
        file) start now?  Only if it fits beside the files in use and the
        downloads in flight.  Else its room could not be made (files in use
        never go), and at its publish the budget would evict it (used by
        nobody yet) or the shard a loader reads: downloaded twice.  One
        log line says why not (once per version until a reader opens it);
        `say=False`: the caller says it (`say_no_room`), or not."""
        in_use, _, in_flight = self._taken_beside(obj)
        if in_use + in_flight + obj.size - self._lru.get(obj.key, 0) <= self.max_bytes:  # (a kept copy: no room)
            self._said_no_room.pop(obj.key, None)
            return True
        if say and self.first_refusal(obj):
            self._no_room(obj)
        return False

    def first_refusal(self, obj: RemoteObject) -> bool:
        """Is this the first refusal of this version of `obj` since a reader opened it?  (Marked so.)"""
        if self._said_no_room.get(obj.key) == obj.version:
            return False
        self._said_no_room[obj.key] = obj.version
        return True

    async def say_no_room(self, obj: RemoteObject, state_of: Callable[[RemoteObject], Awaitable[LocalState]]) -> None:
        """A refusal's line, unless `obj` needed no room: complete on disk as a
        copy the budget does not count (baked, prebaked), it is served with no
        download.  `state_of`: Fetcher.state_of (a store thread's look)."""
        try:
            local = (await state_of(obj)).state in (FileState.CACHED, FileState.PREBAKED)
        except LazyfsError:  # the store did not answer in time: said as it was
            local = False
        if local:
            log.debug("%s: not fetched ahead: already local, nothing to fetch", quoted(obj.uri))
        else:
            self._no_room(obj)

    def _no_room(self, obj: RemoteObject) -> None:
        in_use, _, in_flight = self._taken_beside(obj)
        if not self.fits(obj):
            log.info("%s: not fetched ahead: larger than the cache budget (%.1f MiB), it is not kept: its reader "
                     "streams it", quoted(obj.uri), self.max_bytes / 2**20)
            return
        log.info("%s: not fetched ahead: the cache budget (%.1f MiB) has no room for it beside the files in use "
                 "(%.1f MiB) and the downloads in flight (%.1f MiB)", quoted(obj.uri), self.max_bytes / 2**20,
                 in_use / 2**20, in_flight / 2**20)

    @property
    def reserved(self) -> int:
        return sum(self._reserved.values())

    def fits(self, obj: RemoteObject) -> bool:
        return obj.size <= self.max_bytes

    @property
    def in_flight(self) -> int:
        """Bytes of the downloads reserved or about to be (a version counted once)."""
        return sum({**self._held, **self._reserved}.values())

    async def wait_for_room(self, obj: RemoteObject) -> bool:
        """For a download that may wait (prefetch), before it starts: wait
        until the files in use and the downloads in flight leave room for
        `obj` in the budget beside the files fetched ahead and not opened
        yet, then hold that room until `unhold`; False (fetch nothing) if
        only the files fetched ahead and not opened keep it out.

        Without this wait, `reserve` (which must never make a reader wait)
        lets thirty-two prefetches start at once whatever their total, and
        their files on disk overshoot the budget until they are published
        and evicted; a file that does not fit beside the files in use would
        be evicted again at its publish (nothing else may go): downloaded
        for nothing; and making room by evicting a file prefetched before
        and not opened yet throws away what was fetched for what is fetched
        next (a prefetch of more than the budget fetched it all and kept the
        last files).  Other files kept and closed are not counted: `reserve`
        evicts them once a download really starts.  The downloads in flight
        end with `published`, `released` or `unhold`, and the files in use
        with the last `unuse`, each of which wakes it (a reservation never
        given back would shrink the room for good: Prefetcher gives back its
        own); a file held open for good holds the prefetch of what does not
        fit beside it for as long, and one line says so."""
        said = False
        while True:
            in_use, unopened, in_flight = self._taken_beside(obj)
            need = obj.size - self._lru.get(obj.key, 0)  # a file at its path is replaced (or is it: nothing to fetch)
            if in_use + unopened + in_flight + need <= self.max_bytes:
                break
            if not in_flight and in_use + need <= self.max_bytes:
                return False
            if in_use and not said:
                log.info("prefetch of %s waits for room: the cache budget (%.1f MiB) holds the files in use "
                         "(%.1f MiB) and the downloads in flight (%.1f MiB)", quoted(obj.uri),
                         self.max_bytes / 2**20, in_use / 2**20, in_flight / 2**20)
                said = True
            await self._room.wait()
        self._held[obj.version] = obj.size
        return True

    def unhold(self, obj: RemoteObject) -> None:
        """The prefetch of `obj` started its download (whose reservation now
        counts), found it local, or failed: its held room is free again."""
        if self._held.pop(obj.version, None) is not None:
            self._wake()

    def _wake(self) -> None:
        self._room.set()
        self._room = trio.Event()

    async def published(self, obj: RemoteObject, unopened: bool = False) -> None:
        """A reserved download became a file in the store: it counts as used now,
        and anything it pushed over the budget (a file it replaced, an
        estimate off) is evicted.  `unopened`: fetched ahead, no reader opened it."""
        self._reserved.pop(obj.version, None)
        self._wake()
        self._count(obj)
        if unopened and not self.in_use(obj.key):
            self._unopened.add(obj.key)
        await self.make_room(0)

    def linked(self, obj: RemoteObject) -> None:
        """A fetched file was placed in the store without a download of its
        own (linked from the same bytes under another path, or from its
        content-index entry while an eviction removed its path): it counts
        like a published one, and the budget's task evicts anything it
        pushed over (the open that linked it does not wait for that)."""
        self._count(obj)
        self._evict_if_over()

    def _count(self, obj: RemoteObject) -> None:
        self.used += obj.size - self._lru.pop(obj.key, 0)
        self._lru[obj.key] = obj.size

    def released(self, obj: RemoteObject) -> None:
        """A reserved download failed: its room is free again."""
        if self._reserved.pop(obj.version, None) is not None:
            self._wake()

    async def reserve(self, obj: RemoteObject, ahead: bool = False) -> bool:
        """Make room for `obj` and hold it until `published` or `released`;
        False if it can never fit (stream it through).  `ahead`: for a download
        nobody reads yet, which evicts a file fetched ahead and not opened
        only when nothing else can go."""
        if not self.fits(obj):
            if obj.version not in self._said_too_large:  # once, not at each open of it
                self._said_too_large.add(obj.version)
                log.warning("%s (%s) is larger than the cache budget (%s): serving it without keeping it",
                            quoted(obj.uri), *sizes(obj.size, self.max_bytes))
            return False
        # Evict first, then reserve: make_room ends without a checkpoint, so
        # no task sees the room counted twice or not at all.  (Reserving
        # first counted it as taken while the lock was awaited: the level,
        # used + reserved, passed the budget for a moment.)
        await self.make_room(obj.size - self._reserved.get(obj.version, 0), spare_unopened=ahead)
        self._reserved[obj.version] = obj.size
        return True

    async def make_room(self, nbytes: int, spare_unopened: bool = False) -> None:
        async with self._lock:
            victims: dict[str, int] = {}
            order = list(self._lru)  # least recently used first
            if spare_unopened:
                order.sort(key=lambda k: k in self._unopened)  # and those fetched ahead, not opened, last (stable)
            for key in order:
                if self.used + self.reserved + nbytes <= self.max_bytes:
                    break
                if self.in_use(key):
                    continue
                victims[key] = self._lru.pop(key)
                self.used -= victims[key]
                self._unopened.discard(key)
            if not victims:
                return
            self._wake()  # a prefetch waiting for room looks again
            try:
                evicted = await run_sync(self.store.evict_counted, list(victims))
            except NoThread:  # none evicted: counted again, first to go at the next eviction (threads.py)
                for key in reversed(victims):
                    self._lru[key] = victims[key]
                    self._lru.move_to_end(key, last=False)
                self.used += sum(victims.values())
                raise
            # A file already gone (removed by hand) is forgotten, its room free, but was not evicted.
            self.evicted_files += evicted.files
            self.evicted_bytes += evicted.bytes
            if evicted.files:
                log.info("cache budget: evicted %d least recently used files (%.1f MiB): %s", evicted.files,
                         evicted.bytes / 2**20, ", ".join(evicted.keys[:5]) + (" ..." if evicted.files > 5 else ""))
