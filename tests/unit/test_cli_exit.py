"""How `lazyfs` ends: a stop signal (SIGTERM, Ctrl-C) exits a mount with 0
and any other command with 128+signal and one line, wherever it lands; one
that arrives as the process exits (a container stop sent twice, a second
Ctrl-C) neither kills it by the signal nor changes its exit code."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lazyfs import cli
from lazyfs.errors import Interrupted


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def arriving_as_handlers_change(monkeypatch: pytest.MonkeyPatch, raised: BaseException) -> list[int]:
    """CPython runs the handler of a signal that has just arrived before it
    changes any handler: the first change on the way out raises what that
    handler raises (lazyfs's handler of both: a SystemExit, for a mount, or
    an Interrupted, for the other commands)."""
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


@pytest.mark.parametrize("command, raised", [("mount", SystemExit(0)), ("status", Interrupted(signal.SIGTERM))])
@pytest.mark.parametrize("code", [cli.EXIT_OK, cli.EXIT_RUNTIME])
def test_a_stop_signal_during_exit_keeps_the_exit_code(monkeypatch: pytest.MonkeyPatch, handlers: None,
                                                       code: int, command: str, raised: SystemExit) -> None:
    monkeypatch.setattr(cli, "_run", lambda argv: code)
    changed = arriving_as_handlers_change(monkeypatch, raised)
    assert cli.main([command]) == code
    assert -1 in changed, "the signal was never simulated"
    assert {signal.SIGINT, signal.SIGTERM} <= set(changed[changed.index(-1):])
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


@pytest.mark.parametrize("command", ["mount", "status"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_inside_an_exec_of_a_string_exits_with_its_code(sig: int, command: str, tmp_path: Path) -> None:
    """An import creating a dataclass runs `exec()` on a string.  A Ctrl-C
    landing there as a KeyboardInterrupt made CPython 3.11 kill the process
    with SIGINT at exit (no message), even though lazyfs caught it: seen as
    a start-up stop exiting -2 instead of 0, one run in about fifteen.  Run
    with `-m`, as `python -m lazyfs` is: `-c` exits before that check.  A
    mount exits 0; any other command 128+signal, saying so."""
    program = textwrap.dedent(f"""
        from lazyfs import cli

        def start(args):
            exec("import os; os.kill(os.getpid(), {int(sig)}); [i for i in range(100000)]")
            return 1  # the stop did not stop us

        cli._HANDLERS["{command}"] = start
        raise SystemExit(cli.main(["{command}", "/mnt"] if "{command}" == "mount" else ["{command}"]))
    """)
    (tmp_path / "stopped_in_exec.py").write_text(program)
    done = subprocess.run([sys.executable, "-m", "stopped_in_exec"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    expected = (cli.EXIT_OK, "") if command == "mount" else \
        (128 + sig, f"lazyfs: {command} interrupted by {signal.Signals(sig).name}\n")
    assert (done.returncode, done.stderr) == expected


@pytest.mark.parametrize("argv, collecting", [(["status"], True), (["mount", "/mnt/models"], False)])
def test_the_cyclic_collector_is_off_only_for_a_mounts_start_up(handlers: None, argv: list[str],
                                                                 collecting: bool) -> None:
    """Start-up makes objects that live as long as the process: a mount keeps
    the collector off until its ready line (mount._announce turns it on);
    every other command runs with it on, and it is on again after main."""
    seen: list[bool] = []
    saved = dict(cli._HANDLERS)
    cli._HANDLERS[argv[0]] = lambda args: seen.append(gc.isenabled()) or 0
    try:
        assert cli.main(argv) == cli.EXIT_OK
    finally:
        cli._HANDLERS.clear()
        cli._HANDLERS.update(saved)
    assert seen == [collecting]
    assert gc.isenabled()
