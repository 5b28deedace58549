"""Every hop from the trio thread to a worker thread, and what happens when
no thread can be had.

Under a limit of threads or processes (a cgroup's `pids.max`, as a pod's;
`ulimit -u`), `pthread_create` fails with EAGAIN and Python raises
`RuntimeError("can't start new thread")` where the thread is started: in
`trio.to_thread.run_sync`, before the work runs.  trio gives its limiter's
token back and its cache of idle threads is unharmed (the `KeyError:
'popitem()...'` printed with it is only the context: no idle thread was
there to reuse), so the failure passes as soon as one of the process's
threads is free again: a thread that ends its work goes back to that cache,
and the next start takes it without a new `pthread_create`.  So:

- `run_sync`: a call whose thread cannot start is tried again, after
  FIRST_WAIT_S doubling up to MAX_WAIT_S, for PATIENCE_S (a request's: the
  default); then it fails with `NoThread` (EAGAIN, what pthread_create says:
  "Resource temporarily unavailable").  Clean-up that must happen (a lock
  given back, a resume record, a failed download's files, a close) passes
  `patience=MUST` and is tried until a thread starts, or its task is
  cancelled; `run_else` does what needs no thread on the trio thread instead.
- `start_soon`: trio.lowlevel.start_thread_soon, tried again (in a trio
  system task) until the thread starts: the kernel's notifications.
- One line says so, WARNING, at most once a minute for the whole process,
  with the count of the starts refused since (repeats.RepeatedLines); no
  traceback.  `NoThread` is raised marked as logged: fuse_ops, the runner
  and supervise say nothing more of it.
- An exception of the work itself is raised as it is and never retried:
  only a call whose work never began is tried again.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, TypeVar

import trio

from lazyfs.errors import NoThread
from lazyfs.repeats import RepeatedLines
from lazyfs.stats import STATS

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a request waits for a thread before its EAGAIN: a thread of the
# process ends its work within that, most often, and goes back to trio's cache.
PATIENCE_S = 2.0
# Clean-up that must happen: tried until a thread starts.
MUST = math.inf
FIRST_WAIT_S = 0.01
MAX_WAIT_S = 1.0

_LINES = RepeatedLines()


def said(e: BaseException) -> None:
    """The one line of the thread limit (once a minute, counting the others)."""
    STATS.bump("threads_refused")
    _LINES.log(log, logging.WARNING, "no-thread",
               "cannot start a thread (%s): the process is at its limit of threads (its cgroup's pids.max, "
               "ulimit -u); requests that need one wait up to %g s for one, then fail with EAGAIN, and "
               "clean-up waits until one can be had", e, PATIENCE_S)


def no_thread(e: BaseException) -> NoThread:
    err = NoThread(f"cannot start a thread ({e}): the process is at its limit of threads")
    err.logged = True  # type: ignore[attr-defined]  # said() said it
    return err


class _Work:
    """The work of a thread, knowing whether it began: a start that failed
    never ran it, and only then is it tried again."""

    __slots__ = ("args", "began", "fn")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args, self.began = fn, args, False

    def __call__(self) -> Any:
        self.began = True
        return self.fn(*self.args)


async def run_sync(fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None,
                   abandon_on_cancel: bool = False, patience: float = PATIENCE_S) -> T:
    """`trio.to_thread.run_sync(fn, *args)`, its start tried again for
    `patience` seconds if no thread can be had; then NoThread (EAGAIN)."""
    name = f"{getattr(fn, '__name__', 'work')} from {trio.lowlevel.current_task().name}"
    give_up = trio.current_time() + patience
    wait = FIRST_WAIT_S
    while True:
        work = _Work(fn, args)
        try:
            result: T = await trio.to_thread.run_sync(work, limiter=limiter, abandon_on_cancel=abandon_on_cancel,
                                                      thread_name=name)
            return result
        except RuntimeError as e:
            if work.began:
                raise  # the work's own
            said(e)
            if trio.current_time() + wait > give_up:
                raise no_thread(e) from None
        await trio.sleep(wait)
        wait = min(MAX_WAIT_S, wait * 2)


async def run_else(fn: Callable[..., T], inline: Callable[..., T], *args: Any,
                   limiter: trio.CapacityLimiter | None = None) -> T:
    """`fn(*args)` in a thread; `inline(*args)` on the trio thread when no
    thread can be had within PATIENCE_S (the part that cannot wait and needs
    no blocking I/O: closing a lock's descriptor)."""
    try:
        return await run_sync(fn, *args, limiter=limiter)
    except NoThread:
        return inline(*args)


def start_soon(fn: Callable[[], object], deliver: Callable[[Any], object]) -> None:
    """trio.lowlevel.start_thread_soon; when no thread can be had, started
    later, from a system task trying again until one can (trio thread)."""
    try:
        trio.lowlevel.start_thread_soon(fn, deliver)
    except RuntimeError as e:
        said(e)
        trio.lowlevel.spawn_system_task(_start_later, fn, deliver, name="lazyfs thread start")


async def _start_later(fn: Callable[[], object], deliver: Callable[[Any], object]) -> None:
    wait = FIRST_WAIT_S
    while True:
        await trio.sleep(wait)
        try:
            trio.lowlevel.start_thread_soon(fn, deliver)
            return
        except RuntimeError as e:
            said(e)
        wait = min(MAX_WAIT_S, wait * 2)
