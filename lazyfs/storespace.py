"""The store filesystem's size and free space, as `df` on the mount, the stats
file and the metrics report them, asked for without blocking the trio thread.

`statvfs` of a local disk takes microseconds, but a store on a network
filesystem (NFS, EFS) asks its server, which may be slow or gone for good; on
the trio thread that would stall every request of the mount, and a `df` in a
monitoring loop would take the mount down with its server.  So the question
goes to a thread, one at a time, and a caller waits for it at most WAIT_S:
past that, and while a question is still unanswered, the last answer stands.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import trio

log = logging.getLogger(__name__)

# An answer this recent is served again without asking (`df` or a scrape in a loop).
FRESH_S = 1.0
# How long a caller waits for the store's filesystem to answer.
WAIT_S = 1.0


class StoreSpace:
    def __init__(self, ask: Callable[[], os.statvfs_result]) -> None:
        self._ask = ask  # blocking: Store.fsinfo
        self.last = ask()  # at start-up, before the mount serves anything
        self._asked_at = time.monotonic()
        # At most one question in flight: one the filesystem never answers
        # holds this for good, and keeps a thread, but only one.
        self._asking = trio.CapacityLimiter(1)
        self._failing: str | None = None  # the error of the last question, logged once

    async def current(self) -> os.statvfs_result:
        """A fresh answer if the store's filesystem gives one within WAIT_S,
        else the last one (trio thread).  A filesystem that fails the
        question (EIO, ESTALE) is reported once in the log, not to the
        caller: sizes are a report, and the store's reads say what fails."""
        if time.monotonic() - self._asked_at < FRESH_S:
            return self.last
        if self._asking.available_tokens == 0:
            log.debug("the store's filesystem has not answered statvfs yet; reporting its last answer")
            return self.last
        with trio.move_on_after(WAIT_S):
            try:
                self.last = await trio.to_thread.run_sync(self._ask, limiter=self._asking, abandon_on_cancel=True)
            except OSError as e:
                if str(e) != self._failing:
                    log.warning("the store's filesystem fails statvfs (%s); reporting its last known size", e)
                    self._failing = str(e)
            else:
                self._failing = None
            self._asked_at = time.monotonic()
        return self.last
