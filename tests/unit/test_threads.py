"""threads.py: a thread that cannot be started is waited for (a request's
call briefly, clean-up until it can), then EAGAIN; the work's own errors are
never retried; one line a minute says it (support/threadlimit.py refuses the
starts, as pthread_create does under a pids limit)."""

from __future__ import annotations

import errno
import logging
from typing import Any

import pytest
import trio

from lazyfs import threads
from lazyfs.errors import NoThread, thread_limit
from lazyfs.repeats import RepeatedLines
from support.enginekit import trio_test
from support.threadlimit import ThreadLimit


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch) -> ThreadLimit:
    monkeypatch.setattr(threads, "_LINES", RepeatedLines())  # this test's own "once a minute"
    return ThreadLimit(monkeypatch)


@trio_test
async def test_a_start_refused_for_a_moment_is_tried_again_and_the_work_runs_once(limit: ThreadLimit) -> None:
    ran: list[int] = []
    limit.on = True

    async def lift() -> None:
        while limit.refused < 3:
            await trio.sleep(0.001)
        limit.on = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lift)
        assert await threads.run_sync(lambda x: ran.append(x) or x * 2, 21, patience=threads.MUST) == 42
    assert ran == [21]


@trio_test
async def test_a_start_refused_past_the_patience_is_eagain_said_once(limit: ThreadLimit, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="lazyfs.threads")
    limit.on = True
    for _ in range(3):
        with pytest.raises(NoThread) as got:
            await threads.run_sync(lambda: 1, patience=0.05)
        assert got.value.errno == errno.EAGAIN and getattr(got.value, "logged", False)
        assert thread_limit(got.value)
    lines = [r for r in caplog.records if r.name == "lazyfs.threads"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and not lines[0].exc_info
    assert "cannot start a thread" in lines[0].getMessage()


@trio_test
async def test_the_works_own_runtime_error_is_raised_as_it_is_never_retried(limit: ThreadLimit) -> None:
    calls: list[int] = []

    def work() -> None:
        calls.append(1)
        raise RuntimeError("can't start new thread")  # one the work itself met: not ours to retry

    with pytest.raises(RuntimeError):
        await threads.run_sync(work)
    assert calls == [1] and limit.refused == 0


@trio_test
async def test_run_else_does_the_inline_part_when_no_thread_comes(limit: ThreadLimit,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "PATIENCE_S", 0.05)
    limit.on = True
    assert await threads.run_else(lambda x: ("thread", x), lambda x: ("inline", x), 7) == ("inline", 7)
    limit.on = False
    assert await threads.run_else(lambda x: ("thread", x), lambda x: ("inline", x), 7) == ("thread", 7)


@trio_test
async def test_a_low_level_start_refused_is_started_later(limit: ThreadLimit) -> None:
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()
    limit.on = True
    threads.start_soon(lambda: None, lambda _: token.run_sync_soon(done.set))
    await trio.sleep(0.05)
    assert not done.is_set() and limit.refused >= 2
    limit.on = False
    with trio.fail_after(5):
        await done.wait()


def test_a_thread_limit_is_told_apart_from_other_runtime_errors() -> None:
    assert thread_limit(RuntimeError("can't start new thread"))
    assert not thread_limit(RuntimeError("dictionary changed size during iteration"))
