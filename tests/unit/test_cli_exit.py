"""How `lazyfs` ends: a stop signal that arrives as the process exits (a
container stop sent twice, a second Ctrl-C) neither kills it by the signal
nor changes its exit code."""

from __future__ import annotations

import signal
from typing import Any, Callable, Iterator

import pytest

from lazyfs import cli


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def arriving_as_handlers_change(monkeypatch: pytest.MonkeyPatch, raised: BaseException) -> list[int]:
    """CPython runs the handler of a signal that has just arrived before it
    changes any handler: the first change on the way out raises what that
    handler raises (KeyboardInterrupt for SIGINT, lazyfs's SIGTERM handler a
    SystemExit)."""
    real: Callable[..., Any] = signal.signal
    changed: list[int] = []

    def change(sig: int, handler: Any) -> Any:
        if -1 not in changed and handler == signal.SIG_IGN:
            changed.append(-1)
            raise raised
        changed.append(sig)
        return real(sig, handler)

    monkeypatch.setattr(signal, "signal", change)
    return changed


@pytest.mark.parametrize("raised", [KeyboardInterrupt(), SystemExit(0)], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("code", [cli.EXIT_OK, cli.EXIT_RUNTIME])
def test_a_stop_signal_during_exit_keeps_the_exit_code(monkeypatch: pytest.MonkeyPatch, handlers: None,
                                                       raised: BaseException, code: int) -> None:
    monkeypatch.setattr(cli, "_run", lambda argv: code)
    signal.signal(signal.SIGTERM, cli._stop)
    changed = arriving_as_handlers_change(monkeypatch, raised)
    assert cli.main(["status"]) == code
    assert -1 in changed, "the signal was never simulated"
    assert {signal.SIGINT, signal.SIGTERM} <= set(changed[changed.index(-1):])
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
