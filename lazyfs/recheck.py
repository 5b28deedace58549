"""What one object's HEAD says between listings: a download found the object
replaced or gone (a 412, a 404), and a name a 404 took is asked about again.

A GET answered 404 for a listed object is confirmed by one HEAD, and if that
says 404 too, the name goes at once.  The object may be deleted, or the store
may not find it for a while: SeaweedFS answers 404 for about 30 s after a link
flap for objects its listing still names, as can a replica that lags behind or
a gateway.  Only asking again tells them apart, so the name is asked about
again (one HEAD) RECHECK_FIRST_S after it went, then after twice as long each
time, for as long as `--refresh` (NO_REFRESH_S with `--refresh 0`):

- found: served again at once (the kernel is told), with the ETag and size it
  had the same version, with others a new version like any changed object (a
  new inode, its own bytes: nothing of the old one is served for it); the
  listed ETag with another size is an answer that contradicts itself, not a
  version: the listed one is kept;
- still 404 when the time is up: the next listing decides (it brings the name
  back if it names the object: Catalog.patch);
- a listing that succeeds meanwhile ends the re-checks: it knows.

While it is asked about, the name counts as missing in `.lazyfs/states.json`
(`asked_again`, through Catalog.asked_again): `lazyfs status` shows it, and
`--require-all` is not ready, as for any file not on disk.

Nothing is asked in steady state: a re-check follows a 404, and one name costs
at most log2(--refresh / 2) of them (4 with the default 60 s) per 404.

On the trio thread but the HEADs: HEADS threads at most, a limiter of their
own (a download's readers wait for `object_changed`; a re-check holds nobody).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import suppress
from typing import Callable, Sequence

import trio

from lazyfs import supervise
from lazyfs.catalog import Catalog
from lazyfs.errors import ObjectNotFound, RemoteError, RemoteUnavailable
from lazyfs.namespace import Diff, RemoteObject
from lazyfs.threads import run_sync
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

# The first re-check of a name a 404 took: past a blip (a gateway's, a replica
# catching up), short enough that a loader retrying its open finds it back.
RECHECK_FIRST_S = 2.0
# With --refresh 0 (listings only on SIGHUP), re-checks go on this long: the
# default refresh interval.
NO_REFRESH_S = 60.0
# HEADs of changed or missing objects at once (their own threads).
HEADS = 4


@dataclasses.dataclass
class Missing:
    """A name a 404 took: when it went, and when to ask again."""

    old: RemoteObject
    since: float
    due: float
    wait: float
    listings: int  # Catalog.listings_ok when it went: a later listing decides instead


class Schedule:
    """When to ask again about each name a 404 took: after `first` seconds,
    then twice as long each time, while within `horizon` of when it went.
    Pure: the caller says what time it is."""

    def __init__(self, horizon: float, first: float) -> None:
        self.horizon = horizon
        self.first = first
        self.missing: dict[str, Missing] = {}

    def dropped(self, old: RemoteObject, now: float, listings: int) -> bool:
        """The name of `old` went at `now`: asked about again (True) unless the next listing comes first."""
        if self.first > self.horizon:
            return False
        self.missing[old.key] = Missing(old, now, now + self.first, self.first, listings)
        return True

    def next_due(self) -> float:
        return min((m.due for m in self.missing.values()), default=math.inf)

    def due(self, now: float) -> list[Missing]:
        return [m for m in self.missing.values() if m.due <= now]

    def again(self, key: str, now: float) -> bool:
        """Still not found at `now`: asked again after twice the last wait if
        that is within the horizon (True), else no more (False)."""
        m = self.missing.get(key)
        if m is None:
            return False
        m.wait *= 2
        if now + m.wait - m.since > self.horizon:
            del self.missing[key]
            return False
        m.due = now + m.wait
        return True

    def done(self, key: str) -> None:
        self.missing.pop(key, None)


class Rechecks:
    """The mount's HEADs of single objects: `object_changed` (the download
    engine's hook) and `run` (the re-checks, a task of the mount's nursery).
    `listeners` are told each change (the kernel's names, prefetch);
    `relist` asks for a listing when a HEAD could not say."""

    def __init__(self, catalog: Catalog, refresh: float, listeners: Sequence[Callable[[Diff], object]] = (),
                 relist: Callable[[], None] = lambda: None) -> None:
        self.catalog = catalog
        self.schedule = Schedule(refresh if refresh > 0 else NO_REFRESH_S, RECHECK_FIRST_S)
        self.listeners = list(listeners)
        self.relist = relist
        self._heads = trio.CapacityLimiter(HEADS)
        self._woken = trio.Event()
        catalog.asked_again = self.asked_again  # (states.json: `lazyfs status` counts them missing)

    async def object_changed(self, old: RemoteObject) -> None:
        """An object replaced or deleted in S3 during its download: learn its
        new version now and tell the kernel, so the next open fetches it (a
        full listing only if the object store could not say).  A name that
        went is asked about again (the schedule above)."""
        diff = await self.recheck(old)
        if diff is None:
            self.relist()
            return
        if not diff:
            return  # nothing to change: another re-check or a listing got there first, or the same version
        supervise.tell(self.listeners, diff)
        if diff.removed:
            again = self.schedule.dropped(old, trio.current_time(), self.catalog.listings_ok)
            log.info("%s: not found in the object store: deleted, or not found for a while (%s)", quoted(old.uri),
                     f"asked again in {self.schedule.first:g} s" if again else "the next listing decides")
            self._woken.set()

    async def recheck(self, old: RemoteObject) -> Diff | None:
        """Ask the store about `old` (a HEAD) and swap what it says into the
        snapshot now, so the next open reads the new version, without
        waiting for the next listing.  Nothing changes (an empty Diff) if a
        listing or another re-check got there first; None if the store could
        not be asked."""
        catalog = self.catalog
        if not catalog.listed.is_set():
            # The first listing will replace this snapshot with its start-up
            # page from before the change: hurry it in, then correct it.
            with suppress(RemoteUnavailable):
                await catalog.listed_or_failing()
        try:
            new: RemoteObject | None = await self._head(old)
        except ObjectNotFound:
            new = None
        except RemoteError as e:
            log.warning("%s: could not check its new version (%s); the next listing will", quoted(old.uri), e)
            return None
        listings = catalog.listings_ok
        while True:
            before = catalog.tree
            current = before.find(old.key)
            if not isinstance(current, RemoteObject) or not current.same_bytes(old) or \
                    (new is not None and new.same_bytes(old)):
                return Diff()
            tree = await run_sync(before.replaced, old.key, new)
            if catalog.patch(before, tree):
                break
            if catalog.listings_ok != listings:
                return Diff()  # a listing was swapped in meanwhile: it knows better
            # (else another re-check patched the tree meanwhile: patch the one it left)
        if new is None:
            return Diff(removed=(old,))  # (object_changed says it)
        log.info("%s: new version in the object store (ETag %s, %d bytes)", quoted(old.uri), new.etag, new.size)
        return Diff(changed=((old, new),))

    async def run(self) -> None:
        """Ask again about each name a 404 took, when it is due."""
        while True:
            with trio.move_on_at(self.schedule.next_due()):
                await self._woken.wait()
            self._woken = trio.Event()
            for m in self.schedule.due(trio.current_time()):
                await self._again(m)

    async def _again(self, m: Missing) -> None:
        key = m.old.key
        if self.schedule.missing.get(key) is not m:
            return  # gone from the schedule, or went again since
        if self._settled(m):
            self.schedule.done(key)
            return
        try:
            found = await self._head(m.old)
        except RemoteError as e:  # not found, or not to be asked now: as long a wait again
            if not self.schedule.again(key, trio.current_time()):
                log.info("%s: still not found in the object store (%s); the next listing decides",
                         quoted(m.old.uri), "404" if isinstance(e, ObjectNotFound) else f"could not ask: {e}")
            return
        obj = m.old if found.same_bytes(m.old) else found  # (the listing's own entry, if the same version)
        self.schedule.done(key)
        while not self._settled(m):
            before = self.catalog.tree
            tree = await run_sync(before.replaced, key, obj)
            if tree is before:
                return  # its folder went meanwhile: the next listing decides
            if self.catalog.patch(before, tree):
                log.info("%s: found again in the object store%s, %.0f s after a 404: served again", quoted(obj.uri),
                         "" if obj is m.old else f", a new version (ETag {obj.etag}, {obj.size} bytes)",
                         trio.current_time() - m.since)
                supervise.tell(self.listeners, Diff(added=(obj,)))
                return

    def asked_again(self) -> list[RemoteObject]:
        """The names a 404 took that are still being asked about (neither found
        nor settled by a listing): missing for now, not gone for good."""
        return [m.old for m in self.schedule.missing.values() if not self._settled(m)]

    def _settled(self, m: Missing) -> bool:
        """A listing succeeded since the name went, or something is at its path again."""
        return self.catalog.listings_ok != m.listings or self.catalog.tree.find(m.old.key) is not None

    async def _head(self, old: RemoteObject) -> RemoteObject:
        """What a HEAD says of `old` now.  Its ETag with another size is no
        version (an ETag names its bytes, and so their number): an answer
        that contradicts itself (a proxy's, a gateway's) keeps the listed
        version, with one line; the next listing decides."""
        info = await run_sync(self.catalog.remote.head, old.bucket, old.key, limiter=self._heads)
        new = dataclasses.replace(info.obj, checksum_algorithm=info.checksum[0] if info.checksum else "")
        if old.etag and new.etag == old.etag and new.size != old.size:
            log.warning("%s: the object store answered a HEAD with the listed ETag %s but %d bytes, not the listed %d:"
                        " an answer that contradicts itself; keeping the listed version", quoted(old.uri), old.etag,
                        new.size, old.size)
            return old
        return new
