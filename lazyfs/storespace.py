"""The store filesystem's size and free space, as `df` on the mount, the stats
file and the metrics report them, asked for without blocking the trio thread.

`statvfs` of a local disk takes microseconds, but a store on a network
filesystem (NFS, EFS) asks its server, which may be slow or gone for good; on
the trio thread that would stall every request of the mount, and a `df` in a
monitoring loop would take the mount down with its server.  So the question
is asked by one thread at a time (the trio side sends it to a worker and waits
at most WAIT_S; the metrics thread asks itself), and whoever finds it asked
already, or tires of waiting, or finds no thread to ask in (the process at
its thread limit, threads.py), reports the last answer: the stats file,
answered from memory, never fails for want of a thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import trio

from lazyfs.errors import NoThread
from lazyfs.threads import run_sync

log = logging.getLogger(__name__)

# An answer this recent is served again without asking (`df` in a loop).
FRESH_S = 1.0
# How long the trio side waits for the store's filesystem to answer.
WAIT_S = 1.0


class StoreSpace:
    def __init__(self, ask: Callable[[], os.statvfs_result]) -> None:
        self._ask = ask  # blocking: Store.fsinfo
        self.last = ask()  # at start-up, before the mount serves anything
        self._asked_at = time.monotonic()
        # Held by the one thread asking: one the filesystem never answers
        # keeps it for good, and no second thread joins it.
        self._asking = threading.Lock()
        self._failing: str | None = None  # the error of the last question, logged once

    def ask_blocking(self) -> os.statvfs_result:
        """Ask now (any thread but the trio thread), unless a question is
        in flight already: then, or if the filesystem fails the question
        (EIO, ESTALE: logged once, since sizes are a report and the store's
        reads say what fails), the last answer."""
        if not self._asking.acquire(blocking=False):
            return self.last
        try:
            self.last = self._ask()
            self._failing = None
        except OSError as e:
            if str(e) != self._failing:
                log.warning("the store's filesystem fails statvfs (%s); reporting its last known size", e)
                self._failing = str(e)
        finally:
            self._asked_at = time.monotonic()
            self._asking.release()
        return self.last

    async def current(self) -> os.statvfs_result:
        """A fresh answer if the store's filesystem gives one within WAIT_S,
        else the last one (trio thread)."""
        if time.monotonic() - self._asked_at < FRESH_S or self._asking.locked():
            return self.last
        with trio.move_on_after(WAIT_S):
            try:
                await run_sync(self.ask_blocking, abandon_on_cancel=True, patience=0)
            except NoThread:  # the process at its thread limit (threads.py said it): the last answer
                pass
        return self.last
