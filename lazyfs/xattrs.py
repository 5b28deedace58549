"""What `getfattr -d` reads of a file: its user.lazyfs.* attributes, answered
from one look at the file.

getfattr lists a file's attributes, then reads them one by one (sorted: the
state before how it was verified).  A download published between two of
those reads showed `state: downloading` beside `verified: CRC32`, two answers
that never held at once.  So a listing of a file's attributes begins a
reading of them: the first attribute read after it looks at the file
(Fetcher.state_of), and the reads that follow within READING_S answer from
that same look.  A read with no listing before it (`getfattr -n NAME`) looks
afresh.  Only the trio thread uses this (no lock).
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from lazyfs.filestate import LocalState
from lazyfs.namespace import RemoteObject

# Read-only attributes on every file (`getfattr -d` shows them); reading one
# never starts a download.
XATTRS = (b"user.lazyfs.state", b"user.lazyfs.source", b"user.lazyfs.etag", b"user.lazyfs.fetched_bytes",
          b"user.lazyfs.verified")
# How long after a listing the reads of a file's attributes answer from one
# look: a getfattr reads them all within microseconds, and an answer is never
# more than this late.
READING_S = 1.0
# Readings kept before the expired ones are dropped (`rsync -X`, `tar
# --xattrs` list every file's).
_PRUNE_AT = 1024


class Readings:
    """Readings of files' attributes in progress, by inode."""

    def __init__(self, look: Callable[[RemoteObject], Awaitable[LocalState]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._look = look
        self._clock = clock
        # inode -> (when its attributes were listed, the object, the look once taken)
        self._open: dict[int, tuple[float, RemoteObject, LocalState | None]] = {}

    def listed(self, inode: int, obj: RemoteObject) -> None:
        """The attributes of `inode` (a copy of `obj`) were listed: a reading begins."""
        now = self._clock()
        if len(self._open) >= _PRUNE_AT:
            self._open = {ino: r for ino, r in self._open.items() if now - r[0] <= READING_S}
        self._open[inode] = (now, obj, None)

    async def state(self, inode: int, obj: RemoteObject) -> LocalState:
        """What is on disk for `obj`, as the reading of its attributes in
        progress saw it, or as it is now when none is."""
        reading = self._open.get(inode)
        if reading is None or reading[1] != obj or self._clock() - reading[0] > READING_S:
            self._open.pop(inode, None)
            return await self._look(obj)
        if reading[2] is not None:
            return reading[2]
        local = await self._look(obj)
        if self._open.get(inode) is reading:  # else a new listing began meanwhile
            self._open[inode] = (reading[0], obj, local)
        return local
