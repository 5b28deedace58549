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

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import trio

from lazyfs.config import Source
from lazyfs.errors import LazyfsError, ObjectNotFound, RemoteError
from lazyfs.listings import walk_local
from lazyfs.namespace import DirNode, Node, RemoteObject, Tree, build_tree, join
from lazyfs.objectstore import ObjectStore
from lazyfs.store import Store

log = logging.getLogger(__name__)

# Listing requests in flight at once per folder, and how many folders are
# listed by delimiter before deeper subtrees are listed flat.
_LIST_CONCURRENCY = 32
_BFS_FOLDERS = 256


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
    def __init__(self, remote: ObjectStore, sources: Sequence[Source], store: Store | None = None) -> None:
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
        # Before the first listing: subtrees listed on demand by lookups, and
        # folders known to exist whose contents were too many to list at once.
        self._subtrees: dict[str, Tree] = {}
        self._known: dict[str, Node] = {}
        self._probing: dict[str, trio.Event] = {}

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
        self._subtrees.clear()
        self._known.clear()
        if was_offline:
            log.info("object store reachable again: live listing of %d objects", tree.objects)
        diff = diff_trees(old, tree)
        if diff or was_offline or not self._saved:
            await self._save(per_source)
        return diff

    async def _save(self, per_source: list[list[RemoteObject]]) -> None:
        if self.store is None:
            return
        for source, objects in zip(self.sources, per_source, strict=False):
            try:
                await trio.to_thread.run_sync(self.store.listings.save, source.bucket, source.prefix, objects)
            except OSError as e:
                log.warning("could not save the listing of %s for offline starts: %s", source, e.strerror)
                return
        self._saved = True

    async def _list_all(self) -> list[list[RemoteObject]]:
        results: list[list[RemoteObject]] = [[] for _ in self.sources]
        errors: list[RemoteError] = []
        async with trio.open_nursery() as nursery:
            for i, source in enumerate(self.sources):
                nursery.start_soon(self._list_source, source, results[i], errors, nursery.cancel_scope)
        if errors:
            raise errors[0]
        return results

    async def _list_source(self, source: Source, out: list[RemoteObject], errors: list[RemoteError],
                           cancel: trio.CancelScope) -> None:
        """Everything under one folder, listing subfolders in parallel.

        Folders are listed by delimiter, breadth first, and their subfolders in
        parallel; once `_BFS_FOLDERS` folders have been opened that way, deeper
        subtrees are listed flat (1000 keys a request).  A tree with fan-out
        (many/d000 ... many/d099) then costs a few round trips instead of one
        sequential page after another, and a deep tree of tiny folders never
        costs a request per folder."""
        limiter = trio.CapacityLimiter(_LIST_CONCURRENCY)
        opened = [0]

        async def guarded(fn: Callable[..., Awaitable[None]], prefix: str, nursery: trio.Nursery) -> None:
            try:
                await fn(prefix, nursery)
            except RemoteError as e:
                errors.append(e)
                cancel.cancel()  # one failed request fails the whole listing

        async def by_folder(prefix: str, nursery: trio.Nursery) -> None:
            async with limiter:
                objects, folders = await trio.to_thread.run_sync(self._list_level, source.bucket, prefix)
            out.extend(objects)
            for folder in folders:
                opened[0] += 1
                fn = by_folder if opened[0] <= _BFS_FOLDERS else flat
                nursery.start_soon(guarded, fn, folder, nursery)

        async def flat(prefix: str, nursery: trio.Nursery) -> None:
            async with limiter:
                objects = await trio.to_thread.run_sync(self._list_flat, source.bucket, prefix)
            out.extend(objects)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, by_folder, source.prefix, nursery)
        out.sort(key=lambda o: o.key)

    def _list_level(self, bucket: str, prefix: str) -> tuple[list[RemoteObject], list[str]]:
        objects: list[RemoteObject] = []
        folders: list[str] = []
        for page, prefixes in self.remote.list_pages(bucket, prefix, delimiter=True):
            objects.extend(page)
            folders.extend(p for p in prefixes if p != prefix)
        return objects, folders

    def _list_flat(self, bucket: str, prefix: str) -> list[RemoteObject]:
        out: list[RemoteObject] = []
        for page, _ in self.remote.list_pages(bucket, prefix):
            out.extend(page)
        return out

    # -- before the first listing: answer lookups on demand ------------------------

    async def lookup(self, parent: str, name: str) -> Node | None:
        """The node at parent/name.  Before the first listing has finished, a
        lookup inside a configured folder is answered by listing just that
        name's subtree (one request), so opening a known path on a huge prefix
        does not wait for the whole listing."""
        path = join(parent, name)
        if self.listed.is_set() or not self._inside_source(path):
            return self.tree.find(path)
        return await self._probe(path)

    async def folder(self, path: str) -> DirNode | None:
        """A whole folder (for readdir): from the tree, or from an early subtree
        listing that covered it; otherwise after the first listing."""
        if not self.listed.is_set() and self._inside_source(path):
            sub = self._covering(path)
            if sub is not None:
                node = sub.find(path)
                return node if isinstance(node, DirNode) else None
        node = (await self.current()).find(path)
        return node if isinstance(node, DirNode) else None

    def _inside_source(self, path: str) -> bool:
        return any((path + "/").startswith(s.prefix) and len(path) + 1 > len(s.prefix)
                   for s in self.sources)

    def _covering(self, path: str) -> Tree | None:
        for top, sub in self._subtrees.items():
            if path == top or path.startswith(top + "/"):
                return sub
        return None

    async def _probe(self, path: str) -> Node | None:
        while True:
            sub = self._covering(path)
            if sub is not None:
                return sub.find(path)
            if path in self._known:
                return self._known[path]
            if self.listed.is_set():
                return self.tree.find(path)
            pending = self._probing.get(path)
            if pending is None:
                break
            await pending.wait()
        self._probing[path] = done = trio.Event()
        try:
            source = next(s for s in self.sources if (path + "/").startswith(s.prefix))
            objects, truncated = await trio.to_thread.run_sync(self.remote.list_some, source.bucket, path)
            mine = [o for o in objects if o.key == path or o.key.startswith(path + "/")]
            if not truncated:
                self._subtrees[path] = build_tree(mine, folders=[s.prefix for s in self.sources],
                                                  mtime_ns=time.time_ns())
                return self._subtrees[path].find(path)
            # Too big to see whole in one request: a folder for sure if keys are
            # below it; its contents come with the full listing.
            if any(o.key.startswith(path + "/") for o in mine):
                self._known[path] = DirNode(path, {}, time.time_ns())
                return self._known[path]
            return (await self.current()).find(path)
        finally:
            del self._probing[path]
            done.set()

    async def recheck(self, old: RemoteObject) -> Diff:
        """A download found `old` replaced or deleted in the object store: ask
        the store about that one object (a HEAD) and swap what it says into
        the snapshot now, so the next open reads the new version, without
        waiting for the next listing.  Nothing changes if a listing got
        there first or the store cannot be asked."""
        try:
            info = await trio.to_thread.run_sync(self.remote.head, old.bucket, old.key)
            new: RemoteObject | None = dataclasses.replace(
                info.obj, checksum_algorithm=info.checksum[0] if info.checksum else "")
        except ObjectNotFound:
            new = None
        except RemoteError as e:
            log.warning("%s: could not check its new version (%s); the next listing will", old.uri, e)
            return Diff()
        before = self.tree
        current = before.find(old.key)
        if not isinstance(current, RemoteObject) or not current.same_bytes(old) or \
                (new is not None and new.same_bytes(old)):
            return Diff()
        tree = await trio.to_thread.run_sync(before.replaced, old.key, new)
        if self.tree is not before:
            return Diff()  # a listing was swapped in meanwhile: it knows better
        self.tree = tree
        log.info("%s: %s", old.uri, "deleted in the object store" if new is None else
                 f"new version in the object store (ETag {new.etag}, {new.size} bytes)")
        return Diff(changed=((old, new),)) if new is not None else Diff(removed=(old,))

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
        for obj, _layer in walk_local(store.layers(), store.identities, source.bucket, source.prefix):
            out.setdefault(obj.key, obj)
        saved = store.listings.load(source.bucket, source.prefix)
        for obj in saved or ():
            out[obj.key] = obj  # the last listing is the best knowledge of versions
    return sorted(out.values(), key=lambda o: o.key)


class Refresher:
    """Lists again every `interval` seconds and on request (SIGHUP, a changed
    object), one listing at a time, and tells listeners what changed."""

    def __init__(self, catalog: Catalog, interval: float,
                 listeners: Sequence[Callable[[Diff], object]] = ()) -> None:
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
                    if k in before and not before[k].same_bytes(o))
    return Diff(added, removed, changed)
