"""The live view of the remote: listings turned into Tree snapshots.

`tree` is replaced by one assignment when a listing completes, so every
request sees one whole listing.  What the tree is, says `state`:

- "live": the last successful listing;
- "saved": the store's saved listing, while the first live listing is failing
  and retried (the object store answered at start, so misses are asked);
- "offline": the store's saved listing because the object store was
  unreachable at start (misses are answered from it);
- "listing" / "failing": no listing yet, the first one in progress or failed
  and retried.  A lookup then lists just its own name (one request), so no
  name is ever answered "missing" (which the kernel caches) before something
  was listed; a request that needs the whole listing fails with EIO (which it
  does not cache) while the listing is failing.

Listing requests run in worker threads under the catalog's own limiters (a
lookup never queues behind a refresh; neither takes trio's default pool), as
does everything O(objects) of a refresh: joining, building, diffing, freeing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Literal, Sequence

import trio

from lazyfs.config import Source
from lazyfs.errors import LazyfsError, RemoteError, RemoteUnavailable
from lazyfs.exhausted import strerror
from lazyfs.inodes import InodeRef, listed_in
from lazyfs.lister import Lister
from lazyfs.listingswap import diff_dropping_old, drop_gradually, same_versions
from lazyfs.namespace import Diff, DirNode, Node, RemoteObject, Tree, build_tree, join
from lazyfs.objectstore import ObjectStore
from lazyfs.offline import offline_objects
from lazyfs.quiet import Quiet, reader_request
from lazyfs.store import Store
from lazyfs.threads import run_sync
from lazyfs.wording import count, quoted

log = logging.getLogger(__name__)

# Listing requests in flight at once: a refresh's (all folders together), and
# lookups' before the first listing.  Well within botocore's connection pool
# beside the GETs (see config.remote_config).
LIST_CONNECTIONS = 8
LOOKUP_CONNECTIONS = 8

State = Literal["live", "saved", "offline", "listing", "failing"]


@dataclasses.dataclass
class RefreshInfo:
    """The outcome of the last listing, for logs and the stats file."""

    at: float = 0.0
    ok: bool = False
    seconds: float = 0.0
    objects: int = 0
    error: str = ""
    skipped: int = 0


class Catalog:
    def __init__(self, remote: ObjectStore, sources: Sequence[Source], store: Store | None = None,
                 quiet: Quiet | None = None) -> None:
        self.remote = remote
        # A mount's: readers' requests go before the first listing's (quiet.py).
        self.quiet = quiet
        self.sources = tuple(sources)
        self.store = store
        # Before any listing: the configured folders and their parents, empty.
        self.tree: Tree = self._build([])
        self.listed = trio.Event()  # the tree answers: a live or a saved listing
        self.settled = trio.Event()  # the first listing is in, or failed (and a saved one is served)
        self.live = False
        self.offline = False  # started from the store: the object store was unreachable
        self.listings_ok = 0  # listings that succeeded (read by store threads: probe.PrebakedCheck)
        self.last = RefreshInfo()
        # Names a 404 took that are being asked about again (recheck.Rechecks sets it): missing for now.
        self.asked_again: Callable[[], list[RemoteObject]] = list
        self.lister = Lister(remote, trio.CapacityLimiter(LIST_CONNECTIONS), turn=self._listing_turn)
        self._lookups = trio.CapacityLimiter(LOOKUP_CONNECTIONS)
        self._attempted = trio.Event()  # replaced after every listing attempt
        self._saved = False  # a listing has been saved for offline starts
        self._lists: list[list[RemoteObject]] | None = None  # the live tree's listing, by source
        self._patched = False  # the tree is not `_lists` as listed: an object's HEAD changed it since (patch)
        self._warned: set[str] = set()  # skipped keys said once
        self._warned_empty: set[Source] = set()  # folders with no object at a live listing, said once
        self.warn_empty = True  # (doctor says it in its own line instead)
        # Before the first listing: subtrees listed on demand by lookups, and
        # folders known to exist whose contents were too many to list at once.
        self._subtrees: dict[str, Tree] = {}
        self._known: dict[str, Node] = {}
        self._probing: dict[str, trio.Event] = {}
        # Folders whose whole listing the start-up check already has, or how it failed.
        self._first_pages: dict[Source, list[RemoteObject]] = {}
        self._failed_at_start: RemoteError | None = None

    def listed_at_start(self, listed: dict[Source, list[RemoteObject]], failed: RemoteError | None = None) -> None:
        """The start-up check's whole listing of these folders: the first listing uses it.  `failed`: the
        check was answered with errors (5xx, SlowDown), and the first listing's first attempt fails with it."""
        self._first_pages, self._failed_at_start = dict(listed), failed

    @property
    def state(self) -> State:
        if self.live:
            return "live"
        if self.listed.is_set():
            return "offline" if self.offline else "saved"
        return "failing" if self.last.error else "listing"

    def _build(self, objects: Sequence[RemoteObject]) -> Tree:
        return build_tree(objects, folders=[s.prefix for s in self.sources], mtime_ns=time.time_ns())

    async def current(self) -> Tree:
        """The tree once a listing (live or saved) is in."""
        await self.listed.wait()
        return self.tree

    def start_pinned(self, objects: list[RemoteObject]) -> None:
        """Serve exactly `objects` (a lock's, pinned.py) from now on: a live
        tree that no listing ever replaces."""
        self._serve(self._build(objects), "")
        self.last = dataclasses.replace(self.last, ok=True)
        self.live = True
        self.settled.set()

    def start_offline(self, objects: list[RemoteObject], reason: str) -> None:
        self._serve(self._build(objects), reason)
        self.offline = True
        self.settled.set()

    async def first_listing(self) -> Diff:
        """The first live listing; if it fails, serve the store's saved listing
        meanwhile (when it has one) and raise.  `settled` is set either way."""
        try:
            return await self.refresh()
        except RemoteError:
            await self._serve_saved()
            raise
        finally:
            self.settled.set()

    async def _serve_saved(self) -> None:
        """Serve what the store knows (its last saved listing and the files on
        disk), if anything.  Lookups of names it does not have still ask."""
        if self.store is None or self.listed.is_set():
            return
        try:
            objects = await run_sync(offline_objects, self.store, self.sources)
        except OSError as e:
            log.warning("cannot read the saved listing: %s", e)
            return
        if objects and not self.listed.is_set():
            self._serve(await run_sync(self._build, objects), self.last.error)
            log.warning("serving the saved listing (%s) until the listing succeeds", count(self.tree.objects, "file"))

    def _serve(self, tree: Tree, reason: str) -> None:
        self.tree = tree
        self._warn_skipped(tree)
        self.last = RefreshInfo(at=time.time(), ok=False, objects=tree.objects, error=reason)
        self.listed.set()

    async def refresh(self) -> Diff:
        """List every source and swap in the new snapshot.  On failure the current
        snapshot stays (it is still the best knowledge) and the error is raised.
        The diff is against the tree served before (none after no listing).
        A live tree whose listing came back the same is kept as it is."""
        started = time.monotonic()
        try:
            # In a holder: when nothing changed, the worker drops the new listing.
            listing = [await self._list_all()]
            before = self._lists if self.live and not self._patched else None  # (patched: the listing decides)
            tree = await run_sync(self._tree_if_changed, before, listing)
        except LazyfsError as e:
            self.last = RefreshInfo(at=time.time(), ok=False, seconds=time.monotonic() - started,
                                    objects=self.tree.objects, error=str(e))
            self._attempt_ended()
            raise
        self.last = RefreshInfo(at=time.time(), ok=True, seconds=time.monotonic() - started,
                                objects=(tree or self.tree).objects, skipped=len((tree or self.tree).skipped))
        self.listings_ok += 1
        self._attempt_ended()
        if tree is None:
            if not self._saved and self._lists is not None:
                await self._save(self._lists)
            return Diff()
        return await self._swap(tree, listing[0])

    async def _swap(self, tree: Tree, per_source: list[list[RemoteObject]]) -> Diff:
        self._warn_skipped(tree, per_source)
        served = self.listed.is_set()
        previous, self.tree = [self.tree], tree
        old_lists, self._lists = [self._lists or []], per_source
        was_live, was_offline, self.live, self.offline, self._patched = self.live, self.offline, True, False, False
        self.listed.set()
        self._subtrees.clear()
        self._known.clear()
        if was_offline:
            log.info("online again, the object store answered: live listing of %s", count(tree.objects, "object"))
        elif served and not was_live:
            log.info("listing succeeded: a live listing (%s) replaces the saved one", count(tree.objects, "object"))
        diff = await run_sync(diff_dropping_old, previous, old_lists, tree) if served else Diff()
        if diff or not was_live or not self._saved:
            await self._save(per_source)
        return diff

    def _tree_if_changed(self, before: list[list[RemoteObject]] | None,
                         listing: list[list[list[RemoteObject]]]) -> Tree | None:
        """In a worker thread: None if the listing names the same versions as
        `before` (then the new listing is dropped here), else its tree."""
        if before is not None and same_versions(before, listing[0]):
            drop_gradually(listing.pop())
            return None
        return self._build([o for objects in listing[0] for o in objects])

    def _attempt_ended(self) -> None:
        self._attempted.set()
        self._attempted = trio.Event()

    async def _save(self, per_source: list[list[RemoteObject]]) -> None:
        if self.store is None:
            return
        for source, objects in zip(self.sources, per_source, strict=False):
            try:
                await run_sync(self.store.listings.save, source.bucket, source.prefix, objects)
            except OSError as e:
                log.warning("could not save the listing of %s for offline starts: %s", source, strerror(e))
                return
        self._saved = True

    async def _list_all(self) -> list[list[RemoteObject]]:
        if self._failed_at_start is not None:  # reachable, so no offline start: the saved listing meanwhile
            failed, self._failed_at_start = self._failed_at_start, None
            raise failed
        results: list[list[RemoteObject]] = [[] for _ in self.sources]
        errors: list[RemoteError] = []

        async def one(i: int, source: Source, cancel: trio.CancelScope) -> None:
            first = self._first_pages.pop(source, None)
            if first is not None:
                results[i] = first
                return
            try:
                results[i] = await self.lister.list_folder(source)
            except RemoteError as e:
                errors.append(e)
                cancel.cancel()  # the listing is whole or it is not used

        async with trio.open_nursery() as nursery:
            for i, source in enumerate(self.sources):
                nursery.start_soon(one, i, source, nursery.cancel_scope)
        if errors:
            raise errors[0]
        return results

    # -- before a live listing: answer lookups on demand --------------------------

    async def lookup(self, parent: str, name: str) -> Node | None:
        """The node at parent/name.  Before a live listing, a lookup inside a
        configured folder is answered by the saved listing if it has the
        name, else by listing just that name's subtree (one request), so
        opening a known path on a huge prefix does not wait for the whole
        listing, and a failing listing never makes a name look missing."""
        path = join(parent, name)
        if self.live or self.offline or not self._inside_source(path):
            return self.tree.find(path)
        if self.listed.is_set():
            node = self.tree.find(path)
            if node is not None:
                return node
        return await self._probe(path)

    def presents(self, ref: InodeRef) -> bool:
        """Is `ref` (a folder's path, a file version) served now: in the tree,
        or, before a live listing, in what a lookup listed of its own name (a
        name the saved listing lacks)?  Before any listing: assume so."""
        if not self.listed.is_set() or listed_in(self.tree, ref):
            return True
        return not self.live and not self.offline and any(listed_in(sub, ref) for sub in self._subtrees.values())

    async def folder(self, path: str) -> DirNode | None:
        """A whole folder (for readdir): from the tree; before a live listing,
        from the saved listing or a lookup's listing of its subtree, else
        after the first listing (EIO while that is failing)."""
        if self.live or self.offline or not self._at_or_inside_source(path):
            node = self.tree.find(path)
        else:
            node = await self._early_folder(path)
        return node if isinstance(node, DirNode) else None

    async def _early_folder(self, path: str) -> Node | None:
        if self.listed.is_set():
            node = self.tree.find(path)
            if isinstance(node, DirNode):
                return node
        await self._probe(path)
        sub = self._covering(path)
        if sub is not None:
            return sub.find(path)
        return (await self.listed_or_failing()).find(path)

    async def _listing_turn(self) -> None:
        if self.quiet is not None and not self.live:
            await self.quiet.turn()

    async def listed_or_failing(self) -> Tree:
        """The tree once a listing is in (hurried: someone waits); while the first listing
        is failing, an error the kernel does not cache, instead of an empty answer."""
        if self.quiet is not None and not self.listed.is_set():
            self.quiet.hurry()
        while not self.listed.is_set():
            if self.last.error:
                raise RemoteUnavailable(f"no listing yet of {', '.join(s.uri for s in self.sources)} "
                                        f"({self.last.error}); retrying")
            await self._attempted.wait()
        return self.tree

    def _inside_source(self, path: str) -> bool:
        return any((path + "/").startswith(s.prefix) and len(path) + 1 > len(s.prefix) for s in self.sources)

    def _at_or_inside_source(self, path: str) -> bool:
        return any((path + "/").startswith(s.prefix) for s in self.sources)

    def _covering(self, path: str) -> Tree | None:
        for top, sub in self._subtrees.items():
            if path == top or path.startswith(top + "/") or top == "":
                return sub
        return None

    async def _probe(self, path: str) -> Node | None:
        while True:
            sub = self._covering(path)
            if sub is not None:
                return sub.find(path)
            if path in self._known:
                return self._known[path]
            if self.live:
                return self.tree.find(path)
            pending = self._probing.get(path)
            if pending is None:
                break
            await pending.wait()
        self._probing[path] = done = trio.Event()
        try:
            return await self._list_subtree(path)
        finally:
            del self._probing[path]
            done.set()

    def patch(self, before: Tree, tree: Tree) -> bool:
        """Serve `tree`, `before` with one object as its HEAD said (recheck.py), unless another tree was
        served meanwhile.  The next listing is then applied even if it names the versions of the last one:
        a name a 404 took comes back with it (a store whose listing names an object it does not find for
        a while)."""
        if self.tree is not before:
            return False
        self.tree, self._patched = tree, True
        return True

    async def _list_subtree(self, path: str) -> Node | None:
        source = next(s for s in self.sources if (path + "/").startswith(s.prefix))
        with reader_request(self.quiet):
            objects, truncated = await run_sync(self.remote.list_some, source.bucket, path,
                                                limiter=self._lookups, abandon_on_cancel=True)
        mine = [o for o in objects if not path or o.key == path or o.key.startswith(path + "/")]
        if not truncated:
            self._subtrees[path] = await run_sync(self._build, mine)
            return self._subtrees[path].find(path)
        # Too big to see whole in one request: a folder for sure if keys are
        # below it; its contents come with the full listing.
        if any(o.key.startswith(path + "/") for o in mine):
            self._known[path] = DirNode(path, {}, time.time_ns())
            return self._known[path]
        return (await self.listed_or_failing()).find(path)

    def _warn_skipped(self, tree: Tree, per_source: Sequence[list[RemoteObject]] = ()) -> None:
        for s in tree.skipped:
            if s.key not in self._warned:
                self._warned.add(s.key)
                log.warning("skipping object %s: %s", quoted(s.key), s.reason)
        for source, objects in zip(self.sources if self.warn_empty else (), per_source, strict=False):
            if source not in self._warned_empty and not any(not o.key.endswith("/") for o in objects):
                self._warned_empty.add(source)  # (a typo, or a folder filled later: the mount goes on)
                log.warning("%s holds no objects (is the folder's name right?): it shows empty until a listing "
                            "finds some", quoted(source.uri))

