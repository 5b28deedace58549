"""How many blocks one request of the sweep takes when the transfer client
hands a request's bytes over only once they are all in (awscrt's S3 client,
`--transfer-client crt`).

That client says nothing while a part is on the wire: its body callback, its
progress callback and even its response headers come once the whole part has
arrived (awscrt 0.38, measured on a throttled link).  Until then the mount
cannot tell a slow request from a dead one: a reader waiting for a block
inside it gets `EIO` after --read-deadline, and crt.py's stall watch cancels
it after --read-timeout.  An 8 MiB part over a connection slower than about
140 KB/s did exactly that, while the file was arriving.

So a request is sized to land well within both: in a quarter of the shorter
of the two (`unseen_s`), at the rate it will get.  Requests share the link:
what the pace keeps is the link's rate, all requests together, learnt from
each request that lands (its bytes over its time, times the requests that
were on the wire beside it, on average: `Wire`).  A request of the sweep is
then a share of what the link brings in within `unseen_s`, split among the
--max-connections requests that will run side by side (whole parts when
all the rest of the file comes within it anyway), in whole blocks, at least
one and at most --part-size; from the file's first block, which ran alone,
within half the time (_ALONE_SHARE).  Sizing them from a lone request's rate, as
if each would have the link to itself, sent 16 parts of 8 MiB over a
16 Mbit/s link: each took a minute, readers inside them got `EIO`, and
their stalls wasted a third of the bytes.  A request cancelled as stalled
says the link is slower than its bytes over --read-timeout: the pace
shrinks to that at once (and crt.py asks for its rest block by block).

A request's time is its last attempt's, the one that delivered (crt.py says
when each begins): an attempt refused (SlowDown, a 5xx) or broken off, and
the backoff before the next, say nothing of the link's speed.  Timed from
the first, three SlowDowns on a file's first block (about 3 s of backoff)
sent the rest of the file a block at a time.  Until a request has landed the
link is unknown: the first is one block, alone (download.py's slow start).
A fast link keeps whole parts (8 MiB needs 1.7 MB/s per connection at the
defaults); boto3 hands over bytes as they come: its requests are always
--part-size.

Trio-side state, like the downloads it belongs to (docs/concurrency.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

# A request should take at most this share of the shorter of --read-deadline and --read-timeout:
# room for the link to slow down four times before anyone waits in vain.
_SHARE = 0.25
# ... but half of it when the rate was measured by a request alone on the wire (the file's first
# block): spread over every request that will share the link, it is already the worst case (a link
# that gave that one request all it has), and a fast link keeps its whole parts from the start.
_ALONE_SHARE = 0.5
# The link brings in at least what one request got; the requests beside it raise that at most this
# many times a landing: the first requests of a sweep to land had the link before the others began to
# send (counted on the wire, but still connecting, or queued in the client), and overstate it.
_MOST_RISE = 2.0



@dataclass(frozen=True, slots=True)
class Limits:
    """How one download may use the network."""

    part_blocks: int  # blocks per request of the sequential sweep
    max_requests: int  # requests in flight once the first bytes arrived
    read_deadline: float  # longest a reader waits for its bytes (EIO after)
    # The CRT hands over a request's bytes only once whole: a reader's requests are then 1 block.
    whole_parts: bool = False
    unseen_s: float = 0.0  # with it, the shorter of --read-deadline and --read-timeout (PartPace)


# When an attempt began: (its first byte, time.monotonic() then, Wire.area() then).
Attempt = tuple[int, float, float]


class Timed(Protocol):
    """A request as the pace sees it (download.Request)."""

    end: int
    attempt: Attempt


class Wire:
    """This process's ranged GETs on the wire (every download's), counted
    over time: how many shared the link while one request ran.  The
    dispatcher counts them as they start and end."""

    __slots__ = ("_area", "_at", "count")

    def __init__(self) -> None:
        self.count = 0
        self._area = 0.0  # requests times seconds on the wire, so far
        self._at = time.monotonic()

    def area(self, now: float) -> float:
        if now > self._at:
            self._area += self.count * (now - self._at)
            self._at = now
        return self._area

    def started(self) -> None:
        self.area(time.monotonic())
        self.count += 1

    def ended(self) -> None:
        self.area(time.monotonic())
        self.count -= 1

    def beside(self, since: Attempt, now: float) -> float:
        """Requests on the wire, on average, from an attempt's start until `now` (itself included)."""
        _, at, area = since
        return max(1.0, (self.area(now) - area) / max(now - at, 1e-3))


class PartPace:
    """Blocks per request of one download's sweep."""

    __slots__ = ("_alone", "_block_size", "_left", "_link", "_most", "_sharing", "_unseen_s", "wire")

    def __init__(self, limits: Limits, block_size: int, wire: Wire, left: Callable[[], int]) -> None:
        """`limits.unseen_s`: how long a request's bytes may be on the wire unseen (0: the client
        hands them over as they come, requests are whole parts); `limits.max_requests`: requests
        that may run side by side (--max-connections); `left`: bytes of the file not on disk yet."""
        self._most = limits.part_blocks
        self._block_size = block_size
        self._unseen_s = limits.unseen_s
        self._sharing = max(1, limits.max_requests)
        self.wire = wire
        self._left = left
        self._link: float | None = None  # bytes per second, all requests together; None: not known yet
        self._alone = False  # _link was measured by a request alone on the wire

    @property
    def blocks(self) -> int:
        if self._unseen_s <= 0:
            return self._most
        if self._link is None:
            return 1
        # What the link brings in while a request may stay unseen.
        budget = self._link * self._unseen_s * (_ALONE_SHARE if self._alone else _SHARE)
        if self._left() <= budget:
            return self._most  # all the rest lands within it, however it is split
        return max(1, min(self._most, int(budget / self._sharing) // self._block_size))

    def stamp(self, first_byte: int, at: float | None = None) -> Attempt:
        at = time.monotonic() if at is None else at
        return first_byte, at, self.wire.area(at)

    def attempting(self, req: Timed, first_byte: int, at: float) -> None:
        """An attempt of `req` began at `at` (a retry's, after its backoff; crt.py says when)."""
        req.attempt = self.stamp(first_byte, at)

    def landed(self, req: Timed) -> None:
        """`req`'s last byte is in."""
        if self._unseen_s <= 0:
            return
        now = time.monotonic()
        first, at, _ = req.attempt
        beside = self.wire.beside(req.attempt, now)
        rate = (req.end - first) / max(now - at, 1e-3)  # this request's
        link = rate * beside
        if self._link is not None:  # at least what this one got; what those beside it add, at most twofold
            link = min(link, max(rate, self._link * _MOST_RISE))
        self._learnt(link, beside)

    def stalled(self, req: Timed, nbytes: int, seconds: float) -> None:
        """No byte of `req`'s last `nbytes` came within `seconds` (crt.py cancels it as stalled):
        its connection is slower than that, and so is the link, shared as it was meanwhile."""
        beside = self.wire.beside(req.attempt, time.monotonic())
        bound = nbytes / seconds * beside
        if self._link is None or bound < self._link:
            self._learnt(bound, beside)

    def _learnt(self, link: float, beside: float) -> None:
        self._link = link
        # Measured alone, and to be spread over several (with --max-connections 1 it is not: a quarter, as ever).
        self._alone = beside < 2 and self._sharing > 1
