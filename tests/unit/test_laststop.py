"""The last resort of a stop that cannot finish (laststop.LastStop): it
detaches the mount only while the mount at the path is still its own."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest

from lazyfs import laststop
from lazyfs.mounttab import MountEntry

MNT = Path("/var/practicus/cache")


def given_up(monkeypatch: pytest.MonkeyPatch, at_start: str, at_end: str | None) -> list[Any]:
    """Mount table devices at the mount's start and when the timer fires
    (None: nothing mounted); what the timer did."""
    table = {"device": at_start}
    done: list[Any] = []
    monkeypatch.setattr(laststop, "find_mount", lambda path: None if table["device"] is None else
                        MountEntry(str(path), "fuse.lazyfs", "lazyfs", table["device"]))
    monkeypatch.setattr(laststop, "abort_and_detach", lambda path: done.append(("detach", path)))
    monkeypatch.setattr(laststop.os, "_exit", lambda code: done.append(("exit", code)))
    stop = laststop.LastStop(MNT, after=15)
    stop.mounted()
    table["device"] = at_end
    stop._give_up()
    return done


def test_our_mount_is_detached_then_the_process_exits_zero(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    assert given_up(monkeypatch, "0:51", "0:51") == [("detach", MNT), ("exit", 0)]
    assert "did not finish in 15 s (a thread is stuck in the kernel" in caplog.text
    assert f"detaching {MNT} and exiting" in caplog.text


@pytest.mark.parametrize("now", ["0:77", None], ids=["the next start's mount", "nothing mounted"])
def test_a_mount_that_is_not_ours_is_left_alone(monkeypatch: pytest.MonkeyPatch, now: str | None) -> None:
    assert given_up(monkeypatch, "0:51", now) == [("exit", 0)]


@pytest.mark.parametrize("broken", ["a closed log stream", "a broken pipe"])
def test_the_process_exits_whatever_its_log_streams_do(monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    """The flushes before os._exit must not keep the process from exiting:
    a stream closed, or a pipe whose reader is gone (the container's log
    collector), raised in the timer's thread and the process never exited."""
    stream = io.StringIO()
    if broken == "a closed log stream":
        stream.close()
    else:
        def broken_pipe() -> None:
            raise BrokenPipeError(32, "Broken pipe")
        stream.flush = broken_pipe  # type: ignore[method-assign]
    handler = logging.StreamHandler(stream)
    handler.handleError = lambda record: None  # type: ignore[method-assign]  (the log line itself: logging's business)
    logging.getLogger().addHandler(handler)
    try:
        assert given_up(monkeypatch, "0:51", "0:51") == [("detach", MNT), ("exit", 0)]
    finally:
        logging.getLogger().removeHandler(handler)


def test_arming_twice_starts_one_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Any] = []
    # a lambda: a class attribute must bind the timer as its argument
    monkeypatch.setattr(laststop.threading.Timer, "start", lambda self: started.append(self))  # noqa: PLW0108
    stop = laststop.LastStop(MNT, after=15)
    stop.arm()
    stop.arm()
    assert len(started) == 1 and started[0].daemon
