"""interrupt.run: a stop signal inside a trio run cancels the command after
its stop hooks and raises Interrupted from outside trio (no half-run loop,
no trio warning); everything else passes through as the command raised it."""

from __future__ import annotations

import os
import signal
from typing import Any, Iterator

import pytest
import trio

from lazyfs import interrupt
from lazyfs.errors import Interrupted, RemoteUnavailable


@pytest.fixture
def stops_interrupt() -> Iterator[None]:
    saved = signal.signal(signal.SIGTERM, lambda signum, frame: interrupt.stop(signum))
    yield
    signal.signal(signal.SIGTERM, saved)


def test_a_signal_runs_the_hooks_then_cancels_and_raises_interrupted(stops_interrupt: None) -> None:
    seen: list[str] = []

    async def hook() -> None:
        seen.append("hook")
        await trio.sleep(0)

    async def command() -> str:
        with interrupt.on_stop(hook):
            os.kill(os.getpid(), signal.SIGTERM)
            try:
                await trio.sleep_forever()
            finally:
                seen.append("cancelled")
        return "done"

    with pytest.raises(Interrupted) as caught:
        interrupt.run(command)
    assert (caught.value.signum, caught.value.exit_code) == (signal.SIGTERM, 143)
    assert seen == ["hook", "cancelled"]


def test_a_second_signal_changes_nothing(stops_interrupt: None) -> None:
    async def command() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await trio.sleep(0)
        os.kill(os.getpid(), signal.SIGTERM)
        await trio.sleep_forever()

    with pytest.raises(Interrupted):
        interrupt.run(command)


def test_what_the_command_returns_or_raises_passes_through(stops_interrupt: None) -> None:
    async def fails() -> Any:
        await trio.sleep(0)
        raise RemoteUnavailable("endpoint unreachable")

    async def works(x: int) -> int:
        await trio.sleep(0)
        return x + 1

    assert interrupt.run(works, 1) == 2
    with pytest.raises(RemoteUnavailable):  # not an ExceptionGroup
        interrupt.run(fails)


def test_outside_a_trio_run_a_stop_raises_at_once() -> None:
    with pytest.raises(Interrupted) as caught:
        interrupt.stop(signal.SIGINT)
    assert caught.value.code == 130


def test_once_a_mounts_signal_receiver_closes_a_stop_signal_is_ignored_never_raised_into_trio() -> None:
    """A mount takes SIGTERM and SIGINT through trio while it serves; when it
    lets them go, only trio's teardown is left.  Handing them back to
    cli._stop (which raises SystemExit) let a second container stop, landing
    in that teardown, end the run as a TrioInternalError with a traceback."""
    import os
    import signal

    import trio

    def raising(signum: int, frame: object) -> None:
        raise SystemExit(0)

    before = {s: signal.signal(s, raising) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        async def serve_then_stop() -> None:
            with interrupt.mount_signals(signal.SIGTERM, signal.SIGINT):
                await trio.sleep(0)
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)  # a second stop, as the run ends
            await trio.sleep(0.05)

        trio.run(serve_then_stop)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
