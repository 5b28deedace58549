"""Bytes a reader gave up on: so that the kernel's retry of a failed read
does not wait a second --read-deadline for bytes that are not coming.

The kernel reads a file in readahead requests; when one fails, it asks again
for the page the reader needs (for an mmap fault, up to twice more), each a
new request for bytes the first one already waited for.  Each used to wait
a full deadline of its own: `cat` got EIO after twice --read-deadline, an
mmap reader SIGBUS after three times.

The rule: a wait for bytes fails at once when a reader gave up on some of
them less than one read deadline ago and none of their bytes has arrived
since.  As soon as bytes arrive, readers wait as usual.  What "arrived"
means is the owner's call (`drop`, `clear`): a download of this process
drops the mark of a block when bytes land on the request bringing it, or on
any request while the block waits for one (it is then queued behind moving
bytes, not stalled; download.py); a follower of another process's download,
which sees whole blocks only, on any new block (coop.py).  A mark lasts one
read deadline at most: a reader that comes later is not the retry of one
that failed, and gets a wait of its own.  A reader already waiting is never
cut short by another's mark.

Trio-side state, like the download it belongs to (docs/concurrency.md).
"""

from __future__ import annotations

from typing import Callable, Iterable

import trio

from lazyfs.errors import RemoteUnavailable
from lazyfs.namespace import RemoteObject
from lazyfs.wording import quoted


class GaveUp:
    """Byte ranges readers waited a whole read deadline for in vain, and when."""

    __slots__ = ("_marks", "deadline")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._marks: dict[tuple[int, int], float] = {}

    def __bool__(self) -> bool:
        return bool(self._marks)

    def mark(self, start: int, end: int, now: float) -> None:
        """A reader waited for bytes [start, end) until `now`, and none came."""
        self._marks = {r: at for r, at in self._marks.items() if now - at < self.deadline}
        self._marks[(start, end)] = now

    def since(self, start: int, end: int, now: float) -> float | None:
        """When a reader last gave up on some of bytes [start, end), if that
        still stands (less than a deadline ago, no bytes of them since)."""
        latest = None
        for (s, e), at in self._marks.items():
            if s < end and start < e and now - at < self.deadline and (latest is None or at > latest):
                latest = at
        return latest

    def refuse(self, obj: RemoteObject, start: int, end: int, now: float) -> None:
        """RemoteUnavailable now if a reader gave up on some of bytes [start, end) and that stands."""
        at = self.since(start, end, now)
        if at is not None:
            raise RemoteUnavailable(f"{quoted(obj.uri)}: no data for bytes {start}-{end}: a read waited "
                                    f"{self.deadline:g} s for them {now - at:.1f} s ago, and none has "
                                    "arrived since", bucket=obj.bucket, key=obj.key)

    async def wait(self, event: trio.Event, obj: RemoteObject, start: int, end: int,
                   missing: Callable[[], Iterable[tuple[int, int]]], deadline: float | None = None) -> None:
        """Wait for `event` (bytes [start, end) are in) at most a read deadline
        (or `deadline` seconds: bytes held for a verification, lastbytes.py),
        or not at all if `refuse` says so; on time-out, mark what `missing()`
        names still missing and raise RemoteUnavailable."""
        self.refuse(obj, start, end, trio.current_time())
        waited = self.deadline if deadline is None else deadline
        with trio.move_on_after(waited):
            await event.wait()
            return
        now = trio.current_time()
        for piece in missing():
            self.mark(*piece, now)
        raise RemoteUnavailable(f"{quoted(obj.uri)}: no data for bytes {start}-{end} within {waited:g} s"
                                f"{'' if deadline is None else ' (all on disk, not verified yet)'}",
                                bucket=obj.bucket, key=obj.key)

    def drop(self, keep: Callable[[int, int], bool]) -> None:
        """Bytes arrived: forget the marks for which `keep(start, end)` is false."""
        self._marks = {r: at for r, at in self._marks.items() if keep(*r)}

    def clear(self) -> None:
        self._marks.clear()
