"""Background tasks that can never take the mount down.

pyfuse3 serves every request from one trio nursery: an exception escaping any
task in it ends the main loop and leaves a dead mount.  Every background task
(listings, prefetch, the engine's dispatcher and bookkeeping, the cache
budget, the signal watcher) therefore runs under one of these wrappers: an
unexpected exception is logged with its traceback, counted in
`lazyfs_background_errors_total{task}`, and the task goes on (after a backoff,
for the long-running ones).  A task that found no thread to start (the
process at its thread limit, threads.py) is counted the same, without a
line of its own: threads.py says that once a minute.  Cancellation passes through untouched.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Iterable, TypeVar

import trio

from lazyfs.errors import NoThread
from lazyfs.stats import STATS

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


def tell(listeners: Iterable[Callable[[T], object]], change: T) -> None:
    """Call each listener with `change`, each on its own: one that fails (one
    line, counted) keeps the change from none of the others (the kernel's
    entries, the read-ahead)."""
    for listener in listeners:
        try:
            listener(change)
        except Exception as e:
            failed(f"listener {getattr(listener, '__qualname__', listener)}", e)


def failed(task: str, exc: BaseException) -> None:
    """One log line with the traceback, and the count, for a task's unexpected failure."""
    STATS.bump("background_errors", task)
    cause = exc
    # A nursery's group of one says nothing in one line: name what it holds.
    inner = getattr(cause, "exceptions", None)  # an exception group's (Python 3.10 too)
    while isinstance(inner, tuple) and len(inner) == 1 and isinstance(inner[0], BaseException):
        cause = inner[0]
        inner = getattr(cause, "exceptions", None)
    if isinstance(cause, NoThread):  # the thread limit: threads.py said it, once a minute, and it passes
        log.debug("background task %s found no thread; the mount goes on", task)
        return
    log.error("background task %s failed unexpectedly (%s: %s); the mount goes on", task,
              type(cause).__name__, cause, exc_info=exc)


async def forever(task: str, fn: Callable[[], Awaitable[object]]) -> None:
    """Run `fn` until it returns; after an unexpected exception, run it again
    after a backoff that doubles up to MAX_BACKOFF_S."""
    delay = FIRST_BACKOFF_S
    while True:
        try:
            await fn()
            return
        except Exception as e:
            failed(task, e)
        await trio.sleep(delay)
        delay = min(MAX_BACKOFF_S, delay * 2)


async def once(task: str, fn: Callable[..., Awaitable[object]], *args: object) -> None:
    """Run `fn(*args)`; an unexpected exception is logged and counted, not raised."""
    try:
        await fn(*args)
    except Exception as e:
        failed(task, e)
