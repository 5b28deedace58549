"""Which bytes go on the wire next.

One dispatcher task hands out connection slots (`--max-connections`) by
priority: bytes a reader is blocked on first, then downloads someone has open
(fewest requests in flight first, so parallel readers share), then background
prefetch (oldest first); the last free slot only for bytes a reader waits
for.  A download the cache budget does not keep sweeps only once a read has
asked it for bytes: every open of such a file starts a new one, and the
kernel may answer all its reads from its page cache.  `pick` is the whole
policy, a function of the downloads' states alone; `Dispatcher` only waits
for a slot and for work.  Trio thread only.
"""

from __future__ import annotations

from typing import Callable, Iterable

import trio

from lazyfs.download import Download, Request
from lazyfs.partpace import Wire


def pick(downloads: Iterable[Download], demanded_only: bool = False) -> tuple[Download, Request] | None:
    """The next request to send, claimed (its blocks become ACTIVE), or None;
    `demanded_only`: only bytes a reader is blocked on."""
    live = [dl for dl in downloads if dl.error is None and not dl.cancelled]
    for dl in live:  # 1: a reader is blocked on these bytes
        req = dl.next_request(demanded_only=True)
        if req is not None:
            return dl, req
    if demanded_only:
        return None
    fg = sorted((dl for dl in live if not dl.background or dl.readers > 0),
                key=lambda d: (len(d.requests), d.started))
    bg = sorted((dl for dl in live if dl.background and dl.readers <= 0), key=lambda d: d.started)
    for dl in fg + bg:  # 2: open files, sharing; 3: prefetch, oldest first
        if not dl.keep and not dl.requests and dl.bytes_fetched == 0:
            continue  # not kept (over the cache budget): no sweep until a read asks (the page cache may answer all)
        req = dl.next_request()
        if req is not None:
            return dl, req
    return None


class Dispatcher:
    """Starts requests as slots free up; `poke()` when there may be new work."""

    def __init__(self, max_connections: int, downloads: Callable[[], Iterable[Download]],
                 start: Callable[[Download, Request], None]) -> None:
        self._slots = trio.Semaphore(max_connections)
        # The last free slot waits for a reader's bytes: a sweep holding every
        # connection for whole parts kept a reader of another file (a
        # config.json beside a shard) waiting for a part to end, past
        # --read-deadline on a slow link.  (With one or two, none is kept.)
        self._keep_last = max_connections > 2
        self._downloads = downloads
        self._start = start  # must pin the download before it returns
        self._work = trio.Event()
        self.closing = False
        self.wire = Wire()  # the requests started and not yet released (partpace.py learns the link's rate from it)

    def poke(self) -> None:
        self._work.set()

    def release(self) -> None:
        """A request finished (or failed): its slot is free."""
        self.wire.ended()
        self._slots.release()
        self.poke()

    async def run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                while True:
                    last = self._keep_last and self._slots.value == 0  # (this one was the last free)
                    picked = None if self.closing else pick(self._downloads(), demanded_only=last)
                    if picked is not None:
                        break
                    self._work = trio.Event()
                    await self._work.wait()
            except BaseException:
                self._slots.release()  # no request took this slot
                raise
            self.wire.started()
            self._start(*picked)
