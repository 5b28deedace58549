"""The `downloading ... %` lines: progress said where it means something.

A reader waiting on a long download sees a line every EVERY_S (the README's
5 s) with the percent, MiB and rate.  Under a burst of 500 cold opens of small
files the same rule, timed from each download's start, logged 430 lines such
as `downloading "s3://b/m/f245.bin": 100% (0.0 of 0.0 MiB, 0.0 MB/s)` in a
minute: each file had waited 5 s for a connection, then came in one piece,
and its line read as a file stuck at 100%.  So:

- a download's clock starts when its first bytes land: time queued behind
  other downloads is no progress to report, and a file whose bytes all come
  in one landing never gets a line, however long it waited;
- a line is said only while some of the file is still to come, at most
  every EVERY_S a file, while a reader has it open (not for a fetch ahead
  nobody reads yet);
- a download that had such lines says once, when its last bytes land, that
  it is now checked before it is published (a large file's check takes
  seconds): not a percent that stays at 100.

Runs on the trio thread, called as blocks land (runner.Runner._landed).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

from lazyfs.download import Download
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

EVERY_S = 5.0


@dataclass(slots=True)
class _Clock:
    first: float  # the first bytes landed
    first_bytes: int  # the download's bytes fetched by then (its rate is of the ones after)
    since: float  # the first bytes landed, or the last line was said
    lines: int = 0

    def rate(self, dl: Download, now: float) -> float:
        """MB/s since the first bytes (time queued for a connection is not the link's)."""
        return (dl.bytes_fetched - self.first_bytes) / max(now - self.first, 1e-6) / 1e6


class ProgressLines:
    def __init__(self) -> None:
        self._clocks: weakref.WeakKeyDictionary[Download, _Clock] = weakref.WeakKeyDictionary()

    def landed(self, dl: Download, now: float) -> None:
        """Blocks of `dl` landed at `now` (time.monotonic())."""
        clock = self._clocks.get(dl)
        if clock is None:
            self._clocks[dl] = _Clock(now, dl.bytes_fetched, now)
            return
        said = dl.readers > 0 and not dl.background
        if dl.ndone >= dl.nblocks:  # all in: what is left is the check and the publish
            if clock.lines and said:
                log.info("downloading %s: all %.1f MiB in (%.1f MB/s); checking it before publishing",
                         quoted(dl.obj.uri), dl.obj.size / 2**20, clock.rate(dl, now))
            clock.lines = 0
            return
        if said and now - clock.since >= EVERY_S:
            clock.since = now
            clock.lines += 1
            log.info("downloading %s: %d%% (%.1f of %.1f MiB, %.1f MB/s)", quoted(dl.obj.uri),
                     100 * dl.ndone // dl.nblocks, dl.fetched_bytes / 2**20, dl.obj.size / 2**20,
                     clock.rate(dl, now))  # (rounded down: 100% is only ever all in)
