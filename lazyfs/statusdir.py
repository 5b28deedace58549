"""The mount's own status folder at the root, `.lazyfs`: `stats.json` (the
counters, `cat MOUNT/.lazyfs/stats.json`) and `states.json` (every file's
state, statesfile.py, which `lazyfs status` reads).  Hidden from listings (so
`find` and `du` never see it), found by name.

Each open of one of its files takes one consistent snapshot, which that
handle's reads answer from (handles above every real one); the trio thread
alone uses this (no lock).
"""

from __future__ import annotations

from typing import Awaitable, Callable

from lazyfs.namespace import DirNode

STATUS_NAME = ".lazyfs"
STATUS_DIR = ("status",)
STATS_FILE: tuple[str, ...] = ("status", "stats.json")
STATES_FILE: tuple[str, ...] = ("status", "states.json")
FILES = {"stats.json": STATS_FILE, "states.json": STATES_FILE}
_VIRTUAL_FH = 1 << 48  # handles of virtual files live above every real one
Snapshot = Callable[[], Awaitable[bytes]]


class StatusFolder:
    """The files of `.lazyfs`, and the snapshots their open handles read."""

    def __init__(self, stats: Snapshot, states: Snapshot | None) -> None:
        # file -> what an open of it takes (states.json is absent with --no-xattrs: no file states)
        self._snapshots: dict[tuple[str, ...], Snapshot] = {STATS_FILE: stats}
        if states is not None:
            self._snapshots[STATES_FILE] = states
        self._open: dict[int, bytes] = {}

    def child(self, name: str) -> tuple[str, ...] | None:
        ref = FILES.get(name)
        return ref if ref in self._snapshots else None

    def node(self, mtime_ns: int) -> DirNode:
        return DirNode(STATUS_NAME, {n: r for n, r in FILES.items() if r in self._snapshots},  # type: ignore[misc]
                       mtime_ns)

    async def open(self, ref: tuple[str, ...]) -> int:
        body = await self._snapshots[ref]()
        fh = next(fh for fh in range(_VIRTUAL_FH + len(self._open) + 1, 1 << 63) if fh not in self._open)
        self._open[fh] = body
        return fh

    def read(self, fh: int, off: int, size: int) -> bytes | None:
        """Bytes of a virtual file's snapshot; None when `fh` is a real file's handle."""
        return self._open.get(fh, b"")[off:off + size] if fh >= _VIRTUAL_FH else None

    def release(self, fh: int) -> bool:
        return self._open.pop(fh, None) is not None
