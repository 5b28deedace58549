"""The live view of the remote: listings turned into Tree snapshots.

`tree` is replaced by one assignment when a listing completes, so every
request sees one whole listing.  Requests that arrive before the first listing
finished wait for it (`current()`); mount readiness does not.

Each complete listing is also saved in the store, so a restart while the
object store is unreachable starts *offline* from what the store knows (the
last listing plus the files on disk), and the next successful refresh brings
the live listing back.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import trio

from lazyfs.config import Source
from lazyfs.errors import LazyfsError, RemoteError
from lazyfs.namespace import RemoteObject, Tree, build_tree
from lazyfs.remote import Remote
from lazyfs.store import Store

log = logging.getLogger(__name__)


@dataclass
class RefreshInfo:
    """The outcome of the last listing, for logs and the stats file."""

    at: float = 0.0
    ok: bool = False
    seconds: float = 0.0
    objects: int = 0
    error: str = ""
    skipped: int = 0


@dataclass(frozen=True)
class Diff:
    added: tuple[RemoteObject, ...] = ()
    removed: tuple[RemoteObject, ...] = ()
    changed: tuple[tuple[RemoteObject, RemoteObject], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


class Catalog:
    def __init__(self, remote: Remote, sources: Sequence[Source], store: Store | None = None) -> None:
        self.remote = remote
        self.sources = tuple(sources)
        self.store = store
        self.tree: Tree = self._build([])
        self.listed = trio.Event()
        self.last = RefreshInfo()
        # True while the tree comes from the store, not from a live listing.
        self.offline = False
        self._saved = False  # a listing has been saved for offline starts
        self._warned: set[str] = set()

    def _build(self, objects: list[RemoteObject]) -> Tree:
        return build_tree(objects, folders=[s.prefix for s in self.sources], mtime_ns=time.time_ns())

    async def current(self) -> Tree:
        if not self.listed.is_set():
            await self.listed.wait()
        return self.tree

    def start_offline(self, objects: list[RemoteObject], reason: str) -> None:
        self.tree = self._build(objects)
        self._warn_skipped(self.tree)
        self.offline = True
        self.last = RefreshInfo(at=time.time(), ok=False, objects=self.tree.objects, error=reason)
        self.listed.set()

    async def refresh(self) -> Diff:
        """List every source and swap in the new snapshot.  On failure the current
        snapshot stays (it is still the best knowledge) and the error is raised."""
        started = time.monotonic()
        try:
            per_source = await self._list_all()
            objects = [o for chunk in per_source for o in chunk]
            tree = await trio.to_thread.run_sync(self._build, objects)
        except LazyfsError as e:
            self.last = RefreshInfo(at=time.time(), ok=False, seconds=time.monotonic() - started,
                                    objects=self.tree.objects, error=str(e))
            self.listed.set()
            raise
        self._warn_skipped(tree)
        old, self.tree = self.tree, tree
        was_offline, self.offline = self.offline, False
        self.last = RefreshInfo(at=time.time(), ok=True, seconds=time.monotonic() - started,
                                objects=tree.objects, skipped=len(tree.skipped))
        self.listed.set()
        if was_offline:
            log.info("object store reachable again: live listing of %d objects", tree.objects)
        diff = diff_trees(old, tree)
        if diff or was_offline or not self._saved:
            await self._save(per_source)
        return diff

    async def _save(self, per_source: list[list[RemoteObject]]) -> None:
        if self.store is None:
            return
        for source, objects in zip(self.sources, per_source):
            try:
                await trio.to_thread.run_sync(self.store.save_listing, source.bucket, source.prefix, objects)
            except OSError as e:
                log.warning("could not save the listing of %s for offline starts: %s", source, e.strerror)
                return
        self._saved = True

    async def _list_all(self) -> list[list[RemoteObject]]:
        results: list[list[RemoteObject]] = [[] for _ in self.sources]
        errors: list[BaseException] = []

        async def one(i: int, source: Source) -> None:
            try:
                results[i] = await trio.to_thread.run_sync(self._list_source, source)
            except RemoteError as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for i, source in enumerate(self.sources):
                nursery.start_soon(one, i, source)
        if errors:
            raise errors[0]
        return results

    def _list_source(self, source: Source) -> list[RemoteObject]:
        out: list[RemoteObject] = []
        for page in self.remote.list_pages(source):
            out.extend(page)
        return out

    def _warn_skipped(self, tree: Tree) -> None:
        for s in tree.skipped:
            if s.key not in self._warned:
                self._warned.add(s.key)
                log.warning("skipping object %r: %s", s.key, s.reason)


def offline_objects(store: Store, sources: Sequence[Source]) -> list[RemoteObject]:
    """What the store knows without the object store: each folder's last saved
    listing, plus files on disk (store and prebaked layers) it does not name.
    Blocking (walks directories): run in a thread or before the mount."""
    out: dict[str, RemoteObject] = {}
    for source in sources:
        for obj, _layer in store.walk_local(source.bucket, source.prefix):
            out.setdefault(obj.key, obj)
        saved = store.load_listing(source.bucket, source.prefix)
        for obj in saved or ():
            out[obj.key] = obj  # the last listing is the best knowledge of versions
    return sorted(out.values(), key=lambda o: o.key)


class Refresher:
    """Lists again every `interval` seconds and on request (SIGHUP, a changed
    object), one listing at a time, and tells listeners what changed."""

    def __init__(self, catalog: Catalog, interval: float,
                 listeners: Sequence[Callable[[Diff], None]] = ()) -> None:
        self.catalog = catalog
        self.interval = interval if interval > 0 else math.inf
        self.listeners = list(listeners)
        self._wanted = trio.Event()

    def request(self) -> None:
        self._wanted.set()

    async def run(self) -> None:
        """The first listing (unless the catalog started offline), then refreshes."""
        if not self.catalog.listed.is_set():
            await self.refresh_once(first=True)
        while True:
            # Offline, try again sooner: a recovering pod wants its listing back.
            wait = min(self.interval, 10.0) if self.catalog.offline else self.interval
            with trio.move_on_after(wait):
                await self._wanted.wait()
            self._wanted = trio.Event()
            await self.refresh_once()

    async def refresh_once(self, first: bool = False) -> Diff | None:
        try:
            diff = await self.catalog.refresh()
        except RemoteError as e:
            log.error("listing failed: %s", e)
            return None
        if first:
            log.info("listed %d objects (%.2f s)", self.catalog.last.objects, self.catalog.last.seconds)
            return diff
        if diff:
            log.info("listing changed: %d added, %d removed, %d changed",
                     len(diff.added), len(diff.removed), len(diff.changed))
            for listener in self.listeners:
                listener(diff)
        return diff


def diff_trees(old: Tree, new: Tree) -> Diff:
    """What changed between two snapshots, for kernel cache invalidation."""
    before = {o.key: o for o in old.files()}
    after = {o.key: o for o in new.files()}
    added = tuple(o for k, o in after.items() if k not in before)
    removed = tuple(o for k, o in before.items() if k not in after)
    changed = tuple((before[k], o) for k, o in after.items()
                    if k in before and not before[k].same_version(o))
    return Diff(added, removed, changed)
