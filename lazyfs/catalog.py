"""The live view of the remote: listings turned into Tree snapshots.

`tree` is replaced by one assignment when a listing completes, so every
request sees one whole listing.  Requests that arrive before the first listing
finished wait for it (`current()`); mount readiness does not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import trio

from lazyfs.config import Source
from lazyfs.errors import LazyfsError, RemoteError
from lazyfs.namespace import RemoteObject, Tree, build_tree
from lazyfs.remote import Remote

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
    dirs_changed: tuple[str, ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.dirs_changed)


class Catalog:
    def __init__(self, remote: Remote, sources: Sequence[Source]) -> None:
        self.remote = remote
        self.sources = tuple(sources)
        self.tree: Tree = self._build([])
        self.listed = trio.Event()
        self.last = RefreshInfo()
        self._warned: set[str] = set()

    def _build(self, objects: list[RemoteObject]) -> Tree:
        return build_tree(objects, folders=[s.prefix for s in self.sources], mtime_ns=time.time_ns())

    async def current(self) -> Tree:
        if not self.listed.is_set():
            await self.listed.wait()
        return self.tree

    async def refresh(self) -> Diff:
        """List every source and swap in the new snapshot.  On failure the current
        snapshot stays (it is still the best knowledge) and the error is raised."""
        started = time.monotonic()
        try:
            objects = await self._list_all()
            tree = await trio.to_thread.run_sync(self._build, objects)
        except LazyfsError as e:
            self.last = RefreshInfo(at=time.time(), ok=False, seconds=time.monotonic() - started,
                                    objects=self.tree.objects, error=str(e))
            self.listed.set()
            raise
        self._warn_skipped(tree)
        old, self.tree = self.tree, tree
        self.last = RefreshInfo(at=time.time(), ok=True, seconds=time.monotonic() - started,
                                objects=tree.objects, skipped=len(tree.skipped))
        self.listed.set()
        return diff_trees(old, tree)

    async def _list_all(self) -> list[RemoteObject]:
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
        return [obj for chunk in results for obj in chunk]

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


def diff_trees(old: Tree, new: Tree) -> Diff:
    """What changed between two snapshots, for kernel cache invalidation."""
    before = {o.key: o for o in old.files()}
    after = {o.key: o for o in new.files()}
    added = tuple(o for k, o in after.items() if k not in before)
    removed = tuple(o for k, o in before.items() if k not in after)
    changed = tuple((before[k], o) for k, o in after.items()
                    if k in before and not before[k].same_version(o))
    return Diff(added, removed, changed)
