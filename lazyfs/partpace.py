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

So a request is sized to land well within both: the rate the download's last
request came at, times a quarter of the shorter of the two, in whole blocks,
at least one and at most --part-size.  That rate is its last attempt's, the
one that delivered (crt.py says when each begins): an attempt refused
(SlowDown, a 5xx) or broken off, and the backoff before the next, say nothing
of the link's speed.  Timed from the first, three SlowDowns on a file's first
block (about 3 s of backoff) sent the rest of the file a block at a time.
The file's first request is one block (download.py), and the sweep waits for
its bytes before it opens up, so the link is measured before any part is
asked for.  A fast link keeps whole parts
(8 MiB needs 1.7 MB/s per connection at the defaults); a slow one gets
requests of one block, each handed over as boto3 hands over a block.  boto3
hands over bytes as they come: its requests are always --part-size.

Trio-side state, like the download it belongs to (docs/concurrency.md).
"""

from __future__ import annotations

# A request should take at most this share of the shorter of --read-deadline and --read-timeout:
# room for the link to slow down four times before anyone waits in vain.
_SHARE = 0.25


class PartPace:
    """Blocks per request of one download's sweep."""

    __slots__ = ("_block_size", "_most", "_unseen_s", "blocks")

    def __init__(self, most_blocks: int, block_size: int, unseen_s: float) -> None:
        """`unseen_s`: how long a request's bytes may be on the wire unseen
        (0: the client hands them over as they come, requests are whole parts)."""
        self._most = most_blocks
        self._block_size = block_size
        self._unseen_s = unseen_s * _SHARE
        self.blocks = most_blocks

    def landed(self, nbytes: int, seconds: float) -> None:
        """A request of `nbytes` took `seconds` from its start to its last byte."""
        if self._unseen_s > 0:
            fit = nbytes / max(seconds, 1e-3) * self._unseen_s
            self.blocks = max(1, min(self._most, int(fit // self._block_size)))
