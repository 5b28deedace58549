"""A stop signal (SIGINT, SIGTERM) for a command that is not `mount`.

A mount treats either as a clean stop (cli._stop).  Any other command
stopped by one has not done its work and must not look as if it had (a
readiness probe's `status --require-all`, a build's `bake`): it raises
`errors.Interrupted`, which exits 128 + the signal (130, 143) with one line.

Outside trio the signal handler raises it wherever the main thread is.
Inside `trio.run` it must not: an exception thrown into trio's own loop
abandons the run half-way (trio warns "guest run got abandoned"), with its
tasks never cancelled and the downloads' files left as they were at that
instant.  So while `run` runs trio, the handler only notes the signal and
asks trio to stop (`TrioToken.run_sync_soon`, which a signal handler may
call): the hooks given to `on_stop` run first (bake records what its
downloads have on disk, for the next run to resume), then the command is
cancelled, the run ends as usual, and `run` raises `Interrupted`.  A second
signal while that happens changes nothing.

trio is imported only when `run` is called: cli imports this module, and a
mount's start-up must not wait for trio's import (startup.py).
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator, TypeVar, cast

from lazyfs.errors import Interrupted

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long the hooks may take before the command is cancelled all the same
# (bake's: Fetcher.close waits at most 2 s for its downloads' records).
STOP_HOOKS_S = 5.0


class _TrioRun:
    """The one trio run in progress, as the signal handler sees it."""

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal, 0 while none came
        self.token: trio.lowlevel.TrioToken | None = None
        self.asked: trio.Event | None = None
        self.hooks: list[Callable[[], Awaitable[object]]] = []

    def ask(self) -> None:
        """On the trio thread: wake the task that stops the command."""
        if self.asked is not None:
            self.asked.set()


class _Now:
    running: _TrioRun | None = None


def stop(signum: int) -> None:
    """What a stop signal does to a command other than mount: raise
    Interrupted, or, while `run` runs trio, stop the run."""
    current = _Now.running
    if current is None:
        raise Interrupted(signum)
    if current.signum:
        return  # a second signal: the stop is under way already
    current.signum = signum
    if current.token is not None:
        try:
            current.token.run_sync_soon(current.ask, idempotent=True)
        except RuntimeError:  # trio.RunFinishedError: the run is ending anyway; `run` raises
            pass


def run(async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """trio.run(async_fn, *args), stopped cleanly by SIGINT or SIGTERM: then
    Interrupted, whatever the cancelled command raised or returned."""
    import trio

    current = _Now.running = _TrioRun()
    try:
        result = trio.run(_until_stopped, current, async_fn, args)
    except BaseException:
        if not current.signum:
            raise
    else:
        if not current.signum:
            return cast(T, result)  # None only when stopped
    finally:
        _Now.running = None
    raise Interrupted(current.signum)


@contextmanager
def on_stop(hook: Callable[[], Awaitable[object]]) -> Iterator[None]:
    """Within this block, a stop signal awaits `hook()` (for at most
    STOP_HOOKS_S) before the command is cancelled."""
    current = _Now.running
    if current is None:
        yield
        return
    current.hooks.append(hook)
    try:
        yield
    finally:
        current.hooks.remove(hook)


async def _until_stopped(current: _TrioRun, async_fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T | None:
    import trio

    with trio.CancelScope() as scope:
        current.asked = trio.Event()
        current.token = trio.lowlevel.current_trio_token()
        # A system task, not a nursery's: a nursery would wrap what the
        # command raises in an ExceptionGroup.  trio cancels it once the
        # command returns.
        trio.lowlevel.spawn_system_task(_stop_when_asked, current, scope)
        if current.signum:  # it came while trio was starting
            current.ask()
        return await async_fn(*args)
    return None


async def _stop_when_asked(current: _TrioRun, scope: trio.CancelScope) -> None:
    import trio

    assert current.asked is not None
    await current.asked.wait()
    with trio.move_on_after(STOP_HOOKS_S):
        for hook in list(current.hooks):
            try:
                await hook()
            except Exception as e:  # stopping all the same: a system task must not raise
                log.warning("while stopping: %s: %s", type(e).__name__, e)
    scope.cancel()


def ignore_stops() -> None:
    """Exiting already: a second SIGTERM or Ctrl-C (a container stop sent
    twice) must not interrupt the interpreter's own clean-up, nor change the
    exit code.  Python runs the handler of a signal that has just arrived
    before it changes any handler, so one arriving now raises here, from
    the old handler (cli._stop's SystemExit, or an Interrupted): it is the stop
    we are doing already, or one that came after the work was done."""
    while True:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        except SystemExit:  # errors.Interrupted too
            continue


@contextmanager
def mount_signals(*signums: int) -> Iterator[Any]:
    """trio.open_signal_receiver for the life of a mount's session; at its end
    SIGTERM and SIGINT are ignored rather than handed back to cli._stop.
    Only trio's own teardown is left then (finalizing async generators), and
    a handler raising SystemExit in there (a container stop sent twice, as
    the mount exits) ended the run as a TrioInternalError: a traceback and
    exit 1 instead of the clean stop already under way."""
    import trio

    try:
        with trio.open_signal_receiver(*signums) as receiver:
            yield receiver
    finally:
        ignore_stops()
