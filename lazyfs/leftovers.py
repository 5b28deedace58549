"""What a download of this process leaves once it ends, given back however
long that takes: its store lock (later opens here, and other processes, may
then take the version), a failed download's files (its resume record saved
for the next open to resume, or its files removed), a discarded download's
files.  Each runs in a store thread (docs/concurrency.md); with the process
at its limit of threads (threads.py) each waits until one can be had, and a
lock that cannot wait has its descriptor closed on the trio thread instead:
nothing stays held, or half done, once the limit passes.
"""

from __future__ import annotations

import logging
from typing import Callable

import trio

from lazyfs.download import Download
from lazyfs.exhausted import strerror
from lazyfs.namespace import RemoteObject, Version
from lazyfs.partials import Partial
from lazyfs.pin import Pin
from lazyfs.store import Store
from lazyfs.threads import MUST, run_else, run_sync
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

# How long a failed download's clean-up waits for the threads still using its file.
PINS_WAIT_S = 30.0


class Leftovers:
    def __init__(self, store: Store, spawn: Callable[..., None], bulk: trio.CapacityLimiter,
                 meta: trio.CapacityLimiter) -> None:
        self.store = store
        self._spawn = spawn  # start a task in the engine's nursery
        self._bulk = bulk  # resume records and discards
        self._meta = meta  # unlocks: an open of the same version may wait for one
        # Versions whose store lock is being given back: an open of one waits
        # (Fetcher.acquire), or it found the lock held, by us, and followed
        # "another lazyfs process" (as after a download stopped, or failed).
        self.unlocking: dict[Version, trio.Event] = {}

    def after_failure(self, dl: Download, discard: bool) -> None:
        """A failed download's file: its resume record saved, or (`discard`) its files removed."""
        self._spawn(self._after_failure, dl, discard, dl.pin())

    async def _after_failure(self, dl: Download, discard: bool, pin: Pin) -> None:
        with pin:
            try:
                with trio.move_on_after(PINS_WAIT_S):
                    while dl.pins > 1:
                        await trio.sleep(0.05)
                if dl.pins > 1:
                    return  # a stuck thread may still write: leave its file alone
                if discard:
                    await run_sync(self.store.partials.discard, dl.partial, limiter=self._bulk, patience=MUST)
                else:
                    await run_sync(dl.partial.save_state, frozenset(dl.partial.done), limiter=self._bulk, patience=MUST)
            except OSError as e:
                log.warning("%s: cleaning up after a failed download: %s", quoted(dl.obj.uri), strerror(e))

    def discard_later(self, partial: Partial) -> None:
        self.store.partials.condemn(partial)
        self._spawn(self._discard, partial)

    async def _discard(self, partial: Partial) -> None:
        try:
            await run_sync(self.store.partials.discard, partial, limiter=self._bulk, patience=MUST)
        except OSError as e:
            log.warning("%s: could not remove a temporary download: %s", quoted(partial.obj.uri), strerror(e))

    def unlock(self, obj: RemoteObject, fd: int) -> None:
        """Give the store lock of `obj`'s download back (other processes may now use, or take over, it)."""
        self.unlocking[obj.version] = done = trio.Event()
        self._spawn(self._unlock, obj, fd, done)

    async def _unlock(self, obj: RemoteObject, fd: int, done: trio.Event) -> None:
        try:
            with trio.CancelScope(shield=True):  # at a stop too: cancelled before its thread ran, it left the lock held
                # No thread to be had: its descriptor is closed here (a later open must not find the lock held).
                await run_else(self.store.partials.unlock, self.store.partials.drop_lock, obj, fd, limiter=self._meta)
        finally:
            done.set()
            if self.unlocking.get(obj.version) is done:  # (not a later download's of the same version)
                del self.unlocking[obj.version]
