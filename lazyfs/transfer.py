"""The seam between readers and the download engine: what an open file, the
prefetcher, `getfattr` and the stats file see of a file still arriving.

Two kinds implement it: a download this process runs (download.Download) and
one another process on the same store runs, followed through the store
(coop.ForeignDownload).  Readers never need to know which.
"""

from __future__ import annotations

from typing import Protocol

import trio

from lazyfs.filemap import FileMap
from lazyfs.namespace import RemoteObject


class Transfer(Protocol):
    obj: RemoteObject
    readers: int  # open handles reading through it
    background: bool  # started by a prefetch, nobody waiting on it
    started: float  # time.monotonic() when it began
    complete: bool  # verified and published
    error: BaseException | None  # why it failed, once it has
    finished: trio.Event  # set when complete or failed

    @property
    def generation(self) -> int:
        """The attempt at the file its bytes are from: a new one after bytes failed verification (lastbytes.py)."""

    @property
    def fmap(self) -> FileMap:
        """The bytes on disk so far (read only what `wait_range` vouched for)."""

    @property
    def fetched_bytes(self) -> int:
        """Bytes of the object on local disk so far."""

    def covered(self, start: int, end: int) -> bool:
        """Are bytes [start, end) on disk?"""

    async def wait_range(self, start: int, end: int) -> None:
        """Return once bytes [start, end) are on disk; raise the download's error."""

    async def wait_drained(self) -> None:
        """Return once nothing is left to request (the last bytes are on their
        way), or the transfer is over: when to start fetching what comes next."""

    def add_reader(self, served: bool = True) -> None:
        """A reader waits for bytes: they go ahead of prefetches.  `served`:
        lazyfs answers its reads (False: an open waiting for the whole file)."""

    def drop_reader(self, served: bool = True) -> None: ...
