"""Drift of a pinned mount (`--lock`): how the bucket moved on since the lock
was made.  A pinned mount's refresh lists the folders (every `--refresh`
seconds and on SIGHUP, never at start: a pinned mount starts with no
request) and compares the listing with the lock, and that is all it does:
the tree served stays the lock's, nothing is fetched, nothing swapped.

What it reports (the stats file, /metrics, `lazyfs status`): objects changed
(another ETag or size at a locked key), deleted, and added since the lock.
A changed or deleted object the lock pins without a version id can no
longer be fetched, unless the bucket keeps it as version null (written before
versioning was on: one HEAD ?versionId=null with If-Match on the locked ETag
says so): it is logged once and its opens fail at once (pinned.Pinning
refusals) unless the store has its bytes; one found back as locked is
fetchable again.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import trio

from lazyfs import wording
from lazyfs.errors import RemoteError, UnsafeKey
from lazyfs.lister import Lister
from lazyfs.lockfile import Entry, Lock
from lazyfs.modeljson import Source
from lazyfs.namespace import RemoteObject, key_parts
from lazyfs.pinned import Pinning
from lazyfs.repeats import RepeatedLines
from lazyfs.threads import run_sync

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drift:
    """The last comparison of the bucket with the lock (checked_at 0: none yet)."""

    checked_at: float = 0.0
    error: str = ""  # the last check failed (the counts are the check before)
    changed: tuple[str, ...] = ()  # keys holding another version than the lock's
    deleted: tuple[str, ...] = ()  # locked keys gone from the bucket
    added: tuple[str, ...] = ()  # keys the bucket has and the lock does not serve
    # What each changed key holds now: (ETag, size).
    now: tuple[tuple[str, str, int], ...] = ()

    @property
    def drifted(self) -> int:
        return len(self.changed) + len(self.deleted)


def compare(lock: Lock, listing: Sequence[RemoteObject], at: float) -> Drift:
    """Blocking, O(objects): run it in a worker thread.  Folder markers and
    keys no mount would show ("a//b", "..") are not files: never "added"."""
    listed = {(o.bucket, o.key): o for o in listing if _a_file(o.key)}
    changed, deleted, now = [], [], []
    for e in lock.entries():
        o = listed.pop((e.bucket, e.key), None)
        if o is None:
            deleted.append(e.key)
        elif (o.etag, o.size) != (e.etag, e.size):
            changed.append(e.key)
            now.append((e.key, o.etag, o.size))
    return Drift(at, "", tuple(changed), tuple(deleted), tuple(sorted(k for _, k in listed)), tuple(now))


def _a_file(key: str) -> bool:
    try:
        key_parts(key)
    except UnsafeKey:
        return False
    return True


class DriftWatch:
    """A pinned mount's refresher: lists, compares, reports (see above)."""

    def __init__(self, pin: Pinning, lister: Lister, sources: Sequence[Source], interval: float,
                 lines: RepeatedLines | None = None) -> None:
        self.pin = pin
        self.lister = lister
        self.sources = tuple(sources)
        self.interval = interval if interval > 0 else math.inf
        self.drift = Drift()
        self._wanted = trio.Event()
        # A check that keeps failing (an endpoint down) logs once, then at most a line a minute.
        self._lines = lines or RepeatedLines()

    def request(self) -> None:
        self._wanted.set()

    async def run(self) -> None:
        while True:  # no check at start: a pinned mount starts with zero requests
            with trio.move_on_after(self.interval):
                await self._wanted.wait()
            self._wanted = trio.Event()
            await self.check_once()

    async def check_once(self) -> Drift:
        started = time.time()
        try:
            listing = [o for s in self.sources for o in await self.lister.list_folder(s)]
        except RemoteError as e:
            self._lines.log(log, logging.WARNING, "drift check failed",
                            "drift check of the lock failed (the mount serves the lock all the same): %s", e)
            self.drift = Drift(started, str(e), self.drift.changed, self.drift.deleted, self.drift.added,
                               self.drift.now)
            return self.drift
        drift = await run_sync(compare, self.pin.lock, listing, started)
        gone = [self.pin.entries[key] for key in sorted({*drift.changed, *drift.deleted})]
        kept = await run_sync(self._kept_as_null, [e for e in gone if not e.version_id])
        self._apply(drift, kept)
        self.drift = drift
        log.info("drift check: %d changed, %d deleted, %d added in the bucket since %s; serving the lock's "
                 "%s as they were", len(drift.changed), len(drift.deleted), len(drift.added),
                 self.pin.lock.short_digest, wording.count(self.pin.lock.files, "file"))
        return drift

    def _kept_as_null(self, entries: list[Entry]) -> set[str]:
        """Blocking, a HEAD each: the keys, pinned by ETag and changed or
        deleted since, whose locked bytes the bucket keeps as version null
        (written before versioning was on): still fetched (pinned.guard)."""
        return {e.key for e in entries if self.pin.null_holds_locked(e)}

    def _apply(self, drift: Drift, kept: set[str]) -> None:
        """Refuse what can no longer be fetched (logged once per key), and
        take back what is there again as locked (at its key, or as version
        null: `kept`).  O(drift + refused), on the trio thread."""
        now = {key: (etag, size) for key, etag, size in drift.now}
        gone = (set(drift.changed) | set(drift.deleted)) - kept
        for key in self.pin.unavailable():
            if key not in gone and not self.pin.entries[key].version_id:
                self.pin.mark_available(key)  # back as locked (a version lost by id stays lost)
        for key in sorted(gone):
            e = self.pin.entries[key]
            if e.version_id:
                continue  # fetched by its version id: the overwrite changes nothing here
            held = now.get(key)
            why = self.pin.why(e, f"it now holds ETag {held[0]}, {held[1]} bytes" if held
                               else "it now holds nothing at that key")
            if self.pin.mark_unavailable(e, why):
                log.warning("%s: %s", wording.quoted(f"s3://{e.bucket}/{e.key}"), why)
