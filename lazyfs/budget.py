"""The cache budget (`--cache-max-size`): fetched files are evicted, least
recently used first, when they would exceed it.

Only files lazyfs fetched (identity origin "fetch") count and can go; files
that were on disk before (prebaked into the image, baked by `lazyfs bake`,
checked with --verify etag) and the --prebaked layers are never touched.  A
file someone has open is never evicted.  A file larger than the whole budget
is still served: it streams through a temporary file that is not kept.

The files already in the store from earlier runs are found by a background
scan, so mounting never waits for it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import trio

from lazyfs.namespace import RemoteObject, Version
from lazyfs.store import Store

log = logging.getLogger(__name__)


class Budget:
    def __init__(self, store: Store, max_bytes: int, in_use: Callable[[str], bool]) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.in_use = in_use
        self.used = 0
        # Bytes promised to downloads in flight (by version), so thirty-two
        # prefetches starting together do not all count the same free room.
        self._reserved: dict[Version, int] = {}
        self.evicted_files = 0
        self.evicted_bytes = 0
        # key -> size of fetched files in the store, least recently used first.
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._lock = trio.Lock()

    async def scan(self) -> None:
        """Account for fetched files left by earlier runs (oldest access first)."""
        found = await trio.to_thread.run_sync(self.store.fetched_files)
        for key, size, _atime in sorted(found, key=lambda f: f[2]):
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

    @property
    def reserved(self) -> int:
        return sum(self._reserved.values())

    def fits(self, obj: RemoteObject) -> bool:
        return obj.size <= self.max_bytes

    async def published(self, obj: RemoteObject) -> None:
        """A reserved download became a file in the store: it counts as used now,
        and anything it pushed over the budget (a file it replaced, an
        estimate off) is evicted."""
        self._reserved.pop(obj.version, None)
        self.used += obj.size - self._lru.pop(obj.key, 0)
        self._lru[obj.key] = obj.size
        await self.make_room(0)

    def released(self, obj: RemoteObject) -> None:
        """A reserved download failed: its room is free again."""
        self._reserved.pop(obj.version, None)

    async def reserve(self, obj: RemoteObject) -> bool:
        """Make room for `obj` and hold it until `published` or `released`;
        False if it can never fit (stream it through)."""
        if not self.fits(obj):
            log.warning("%s (%.1f MiB) is larger than the cache budget (%.1f MiB): serving it "
                        "without keeping it", obj.uri, obj.size / 2**20, self.max_bytes / 2**20)
            return False
        self._reserved[obj.version] = obj.size
        await self.make_room(0)
        return True

    async def make_room(self, nbytes: int) -> None:
        async with self._lock:
            victims: list[str] = []
            for key in list(self._lru):
                if self.used + self.reserved + nbytes <= self.max_bytes:
                    break
                if self.in_use(key):
                    continue
                victims.append(key)
                self.used -= self._lru.pop(key)
            if not victims:
                return
            freed = await trio.to_thread.run_sync(self.store.evict, victims)
            self.evicted_files += len(victims)
            self.evicted_bytes += freed
            log.info("cache budget: evicted %d least recently used files (%.1f MiB): %s",
                     len(victims), freed / 2**20, ", ".join(victims[:5]) + (" ..." if len(victims) > 5 else ""))
