"""A failure repeating in a tight loop: its log lines, and its answers.

`mmap(MAP_POPULATE)` (llama.cpp maps model files so) of a file whose reads
fail, its download stalled past --read-deadline or its object deleted since
the listing, never returns: the kernel retries the failing page fault at
once, for as long as the mapper lives (mm/gup.c, `__mm_populate`), and
nothing lazyfs answers makes that mmap return.  lazyfs answered each retry at
once and logged each: 85,000 ERROR lines in 15 s, and most of a core.  Two
rules make such a loop cheap, and leave a reader's ordinary failure as it was:

- Lines (`RepeatedLines`): a failure logs its line; the same failure again
  (same operation and errno, same message but for its numbers: byte ranges,
  seconds) logs at most one line per LINE_EVERY_S, which counts the ones not
  shown.  Another file's failure (its quoted name differs) logs at once.
- Answers (`FailureLoops`): a file whose failed reads follow each other in a
  tight loop (each less than LOOP_GAP_S after the previous one was answered),
  more than FREE_FAILURES in a row, has each further failure answered after a
  pause, doubling from PAUSE_FIRST_S to PAUSE_MAX_S.  The loop is the file's,
  not an open handle's: a program that opens, reads (fails) and closes in a
  loop gets a new handle each time, and was answered at once for ever.  The
  kernel's retries of one failed read (two or three) and a reader that tries
  again every second or so never wait; a read of the file that succeeds ends
  the loop, and another file's first failures are answered at once.

A request's retries (`retry_line`, in the requests' threads: botocore's and
lazyfs's own) follow the first rule, each attempt number apart: a file whose
GETs keep failing says its retries once, not again at each open that starts
a download failing the same way.

Trio-side state (docs/concurrency.md): the pause is a trio sleep in the
failing request's own task.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable

import cachetools

from lazyfs.exhausted import DESCRIPTOR_ERRNOS, strerror

# One failure's line is shown at most once per this many seconds.
LINE_EVERY_S = 60.0
# Failures kept apart at once; the least recently seen is forgotten beyond
# (its next line is then shown again): bounded, whatever a mount meets.
LINES_KEPT = 4096
# A failed read this soon after the previous failed read of its handle was
# answered continues a loop: the kernel's retries come within microseconds.
LOOP_GAP_S = 0.1
# Files in a failure loop kept apart at once; the least recently failing is
# forgotten beyond (its next failure is answered at once again): bounded.
LOOPS_KEPT = 4096
# Failures in a row answered at once (a readahead's, then the kernel's retries of the page).
FREE_FAILURES = 8
PAUSE_FIRST_S = 0.01
PAUSE_MAX_S = 1.0

# A quoted name (kept whole: files differ by their digits too), or a number (blanked).
_NUMBER_OUTSIDE_QUOTES = re.compile(r'"(?:[^"\\]|\\.)*"|\d+(?:[.,]\d+)*')


def shape(message: str) -> str:
    """`message` with its numbers blanked, outside quoted names: what one failure's lines share."""
    return _NUMBER_OUTSIDE_QUOTES.sub(lambda m: m[0] if m[0].startswith('"') else "#", message)


@dataclass(slots=True)
class _Shown:
    at: float  # when its last line was shown
    hidden: int = 0  # lines not shown since


class RepeatedLines:
    """Log lines of failures, each failure's at most once per `every` seconds."""

    def __init__(self, every: float = LINE_EVERY_S, kept: int = LINES_KEPT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._shown: cachetools.LRUCache[Hashable, _Shown] = cachetools.LRUCache(maxsize=kept)

    def log(self, logger: logging.Logger, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `key`'s line was shown less than `every`
        ago (then count it); whether it was shown."""
        now = self._clock()
        shown = self._shown.get(key)
        if shown is not None and now - shown.at < self.every:
            shown.hidden += 1
            return False
        if shown is not None and shown.hidden:
            msg += " (%s more like it in the last %.0f s)"
            args += (f"{shown.hidden:,}", now - shown.at)
        self._shown[key] = _Shown(now)
        logger.log(level, msg, *args)
        return True

    def failed(self, logger: logging.Logger, op: str, e: BaseException, err: int) -> bool:
        """The one line of a request `op` failing with `e` (errno `err`), at
        the exception's level (LazyfsError.log_level), as `log` allows.  A
        bare OSError for want of a descriptor names the limit (exhausted.py)."""
        said = str(e)
        if isinstance(e, OSError) and e.errno in DESCRIPTOR_ERRNOS:
            said = f"{e.filename}: {strerror(e)}" if e.filename is not None else strerror(e)
        return self.log(logger, getattr(e, "log_level", logging.ERROR), (op, err, shape(said)),
                        "%s: %s (errno %s)", op, said, errno.errorcode.get(err, err))


_RETRY_LINES = RepeatedLines()
_RETRY_LINES_LOCK = threading.Lock()  # (called in the requests' threads)


def retry_line(logger: logging.Logger, level: int, about: Hashable, msg: str, *args: object) -> None:
    """A retry's line; the same retry again (`about`: the object, the
    cause's shape, the attempt number) at most once per LINE_EVERY_S."""
    with _RETRY_LINES_LOCK:
        _RETRY_LINES.log(logger, level, about, msg, *args)


class FailureLoops:
    """Each file's failed reads in a row (whichever handle made them), and the
    pause before the next one's answer."""

    def __init__(self, kept: int = LOOPS_KEPT) -> None:
        self._loops: cachetools.LRUCache[Hashable, FailureLoop] = cachetools.LRUCache(maxsize=kept)

    def pause(self, file: Hashable, now: float) -> float:
        """A read of `file` failed at `now`: the seconds its answer waits."""
        loop = self._loops.get(file)
        if loop is None:
            loop = self._loops[file] = FailureLoop()
        return loop.pause(now)

    def __len__(self) -> int:
        return len(self._loops)

    def ended(self, file: Hashable) -> None:
        """A read of `file` succeeded: its loop, if any, is over."""
        if file in self._loops:  # (a miss costs no KeyError: this runs on every read after a failure)
            del self._loops[file]


class FailureLoop:
    """The failed reads of one file in a row, and the pause before the next one's answer."""

    __slots__ = ("_answered", "_pause", "_streak")

    def __init__(self) -> None:
        self._streak = 0
        self._answered = -math.inf  # when the last failure is answered (after its pause)
        self._pause = 0.0

    def pause(self, now: float) -> float:
        """A read failed at `now`: the seconds its answer waits."""
        self._streak = self._streak + 1 if now - self._answered < LOOP_GAP_S else 1
        if self._streak <= FREE_FAILURES:
            self._pause = 0.0
        else:
            self._pause = min(PAUSE_MAX_S, max(PAUSE_FIRST_S, 2 * self._pause))
        self._answered = now + self._pause
        return self._pause
