"""When the first listing of a big folder may use the network.

A folder of thousands of files takes many listing requests, and the first
listing starts as the mount does: just when readers arrive.  Its pages then
compete with what the readers wait for (a lookup's LIST, the first bytes of a
GET): on a store that answers one request at a time, or on a slow link, an
open waited behind pages nobody had asked for yet.  So readers go first:
the first listing's requests wait while a request a reader needs is in
flight and until the network has been quiet for a moment, unless someone is
waiting for that listing itself (a readdir of a folder too big to list on
its own, `find`), which then goes at full speed.

Trio-side only: every method runs on the trio thread.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator

import trio


class Quiet:
    """Requests in flight that readers wait for, and the wait of background
    listing requests for a quiet network."""

    def __init__(self, quiet_s: float) -> None:
        self.quiet_s = quiet_s
        self.busy = 0  # reader requests in flight
        self.hurried = False  # someone waits for the background work: no more waiting
        self._last = trio.current_time()  # the last reader request's end (or the start)
        self._changed = trio.Event()

    @contextmanager
    def reader_request(self) -> Iterator[None]:
        """Around a request a reader waits for (a lookup's LIST, a ranged GET)."""
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
            self._last = trio.current_time()
            self._poke()

    def restart(self) -> None:
        """Readers can come from now on (the kernel's INIT is answered): the
        quiet period counts from here, not from the mount's start-up, which
        on a loaded machine can take longer than the period itself."""
        self._last = trio.current_time()
        self._poke()

    def hurry(self) -> None:
        """Someone waits for the background work itself: it waits no more."""
        if not self.hurried:
            self.hurried = True
            self._poke()

    async def turn(self) -> None:
        """Return once a background request may go: the network has been
        quiet for `quiet_s`, or hurry() was called."""
        while not self.hurried:
            left = math.inf if self.busy else self._last + self.quiet_s - trio.current_time()
            if left <= 0:
                return
            with trio.move_on_after(left):
                await self._changed.wait()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def reader_request(quiet: Quiet | None) -> AbstractContextManager[None]:
    """`quiet.reader_request()`, or nothing on a mount without a first listing
    to hold back (a pinned mount, the engine's tests)."""
    return quiet.reader_request() if quiet is not None else nullcontext()
