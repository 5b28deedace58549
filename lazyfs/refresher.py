"""Listing again: the first listing until it succeeds, then every `--refresh`
seconds and on request (SIGHUP, a changed object), one listing at a time.

A failed first listing is tried again soon, with backoff (FIRST_RETRY_S
doubling up to RETRY_MAX_S, whatever `--refresh` says, even 0); meanwhile
the mount serves the store's saved listing if it has one, and lookups list
their own names if not (catalog.py).

A listing that keeps failing (an endpoint down or stalled: an offline mount
tries every 10 s) logs its failure once, then at most a line a minute that
counts the failures not shown (repeats.py), and one line when it succeeds
again; it logged three lines a try, ninety in ten minutes.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import trio

from lazyfs import supervise, wording
from lazyfs.catalog import Catalog
from lazyfs.errors import RemoteError
from lazyfs.namespace import Diff
from lazyfs.repeats import RepeatedLines

log = logging.getLogger(__name__)

# The first retry of a failed first listing, doubling up to RETRY_MAX_S, which
# is also how often an offline mount tries to get its listing back.
FIRST_RETRY_S = 0.5
RETRY_MAX_S = 10.0


class Refresher:
    """Lists again every `interval` seconds and on request, and tells
    listeners what changed."""

    def __init__(self, catalog: Catalog, interval: float,
                 listeners: Sequence[Callable[[Diff], object]] = (), lines: RepeatedLines | None = None) -> None:
        self.catalog = catalog
        self.interval = interval if interval > 0 else math.inf
        self.listeners = list(listeners)
        self._wanted = trio.Event()
        self._lines = lines or RepeatedLines()  # a failing listing's lines: one a minute
        self._failures = 0  # failed listings in a row

    def request(self) -> None:
        self._wanted.set()

    async def run(self) -> None:
        """The first listing (unless the catalog started offline), then refreshes."""
        if not self.catalog.listed.is_set():
            await self._first_listing()
        while True:
            # Offline, try again sooner: a recovering pod wants its listing back.
            wait = min(self.interval, RETRY_MAX_S) if self.catalog.offline else self.interval
            await self._wait(wait)
            await self.refresh_once()

    async def _first_listing(self) -> None:
        delay = FIRST_RETRY_S
        while await self.refresh_once(first=True) is None:
            log.debug("trying the listing again in %.1f s", delay)
            await self._wait(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _wait(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._wanted.wait()
        self._wanted = trio.Event()

    async def refresh_once(self, first: bool = False) -> Diff | None:
        """One listing; the diff against what was served (None if it failed)."""
        was_live = self.catalog.live
        try:
            diff = await (self.catalog.first_listing() if first else self.catalog.refresh())
        except RemoteError as e:
            self._failures += 1
            # At the error's own level: access denied is the credentials' or the policy's, a WARNING.
            self._lines.log(log, e.log_level, "listing failed", "listing failed: %s", e)
            return None
        if self._failures and was_live:  # (otherwise the catalog says the live listing is back)
            log.info("listing succeeded again after %s", wording.count(self._failures, "failed attempt"))
        self._failures = 0
        if first:
            log.info("listed %s (%.2f s)", wording.count(self.catalog.last.objects, "object"),
                     self.catalog.last.seconds)
        if diff:
            # Listeners first: the kernel's entries are being invalidated by
            # the time the line is read (tests wait for it before reopening).
            supervise.tell(self.listeners, diff)
            # Nothing a user sees changed (entries going live from a saved listing, which keeps no checksum
            # algorithm): no line, as for a refresh that finds nothing.
            if diff.added or diff.removed or diff.changed or diff.new_dates:
                log.info("listing changed: %d added, %d removed, %d changed%s", len(diff.added), len(diff.removed),
                         len(diff.changed), "" if diff.added or diff.removed or diff.changed else " (new dates only)")
        return diff
