"""The mount's own status folder at the root, `.lazyfs`: `stats.json` (the
counters, `cat MOUNT/.lazyfs/stats.json`) and `states.json` (every file's
state, statesfile.py, which `lazyfs status` reads).  Hidden from listings (so
`find` and `du` never see it), found by name.

Each open of one of its files reads one consistent snapshot, which that
handle's reads answer from (handles above every real one), and `stat` shows
its true size: a lookup of the file takes the snapshot an open would read
(the kernel looks the name up again before every open: its entry is never
cached), and the open and the `fstat` that follow within REUSE_S of it read
that same one, so the size a reader is told (`cp`, `head -c`, mmap) is the
size of the bytes it gets.  A `getattr` later than that takes a new one.  So
a `stat` costs a snapshot, as an open does: states.json's is a look at
every file (statesfile.py), seconds on a very large mount; `cat` and `lazyfs
status` take one, as before.  The trio thread alone uses this (no lock).
"""

from __future__ import annotations

from typing import Awaitable, Callable

import trio

from lazyfs.namespace import DirNode

STATUS_NAME = ".lazyfs"
STATUS_DIR = ("status",)
STATS_FILE: tuple[str, ...] = ("status", "stats.json")
STATES_FILE: tuple[str, ...] = ("status", "states.json")
FILES = {"stats.json": STATS_FILE, "states.json": STATES_FILE}
_VIRTUAL_FH = 1 << 48  # handles of virtual files live above every real one
# A lookup's snapshot is what the open and the fstat following it read, if they come within this long:
# milliseconds apart, but on a busy trio thread later; never long enough to serve a stale document
# to a reader who looks again (each lookup takes a new one).
REUSE_S = 1.0
Snapshot = Callable[[], Awaitable[bytes]]


class StatusFolder:
    """The files of `.lazyfs`, and the snapshots their open handles read."""

    def __init__(self, stats: Snapshot, states: Snapshot | None) -> None:
        # file -> what an open of it takes (states.json is absent with --no-xattrs: no file states)
        self._snapshots: dict[tuple[str, ...], Snapshot] = {STATS_FILE: stats}
        if states is not None:
            self._snapshots[STATES_FILE] = states
        self._open: dict[int, bytes] = {}
        self._latest: dict[tuple[str, ...], tuple[float, bytes]] = {}  # file -> (trio time, its last snapshot)

    def child(self, name: str) -> tuple[str, ...] | None:
        ref = FILES.get(name)
        return ref if ref in self._snapshots else None

    def node(self, mtime_ns: int) -> DirNode:
        return DirNode(STATUS_NAME, {n: r for n, r in FILES.items() if r in self._snapshots},  # type: ignore[misc]
                       mtime_ns)

    def size(self, ref: tuple[str, ...]) -> int:
        """The size of the file's last snapshot (0 before any)."""
        latest = self._latest.get(ref)
        return len(latest[1]) if latest is not None else 0

    async def take(self, ref: tuple[str, ...], again: bool = True) -> bytes:
        """The snapshot an open now reads, `size` its size: a new one (a
        lookup), or, not `again`, the last one if it was taken within
        REUSE_S (an open, a getattr)."""
        latest = self._latest.get(ref)
        if not again and latest is not None and trio.current_time() - latest[0] <= REUSE_S:
            return latest[1]
        body = await self._snapshots[ref]()
        self._latest[ref] = trio.current_time(), body
        return body

    async def open(self, ref: tuple[str, ...]) -> int:
        body = await self.take(ref, again=False)
        fh = next(fh for fh in range(_VIRTUAL_FH + len(self._open) + 1, 1 << 63) if fh not in self._open)
        self._open[fh] = body
        return fh

    def read(self, fh: int, off: int, size: int) -> bytes | None:
        """Bytes of a virtual file's snapshot; None when `fh` is a real file's handle."""
        return self._open.get(fh, b"")[off:off + size] if fh >= _VIRTUAL_FH else None

    def release(self, fh: int) -> bool:
        return self._open.pop(fh, None) is not None
