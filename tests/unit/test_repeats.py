"""A failure repeating in a tight loop: its lines and its pauses (repeats.py)."""

from __future__ import annotations

import errno
import logging

import pytest

from lazyfs.errors import RemoteUnavailable
from lazyfs.repeats import FREE_FAILURES, LOOP_GAP_S, PAUSE_MAX_S, FailureLoop, FailureLoops, RepeatedLines, shape

log = logging.getLogger("test.repeats")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gave_up(uri: str, ago: float, start: int = 0) -> RemoteUnavailable:
    return RemoteUnavailable(f'"{uri}": no data for bytes {start}-{start + 4096}: a read waited 5 s for them '
                             f"{ago:.1f} s ago, and none has arrived since")


def test_a_message_shape_blanks_numbers_but_not_quoted_names() -> None:
    assert shape('"s3://b/shard-00001.bin": no data for bytes 0-4096 within 2.5 s') == \
        '"s3://b/shard-00001.bin": no data for bytes #-# within # s'
    assert shape('"a\\"1": 12,345 more') == '"a\\"1": # more'


def test_a_repeated_failure_logs_once_then_once_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    lines = RepeatedLines(every=60, clock=clock)
    caplog.set_level(logging.INFO, logger="test.repeats")
    assert lines.failed(log, "read", gave_up("s3://b/m.bin", 0.0), errno.EIO)
    for i in range(1233):
        clock.now += 0.01
        assert not lines.failed(log, "read", gave_up("s3://b/m.bin", i / 100, start=4096 * i), errno.EIO)
    assert len(caplog.records) == 1
    clock.now = 1000.0 + 61
    assert lines.failed(log, "read", gave_up("s3://b/m.bin", 4.6), errno.EIO)
    assert len(caplog.records) == 2
    assert caplog.records[1].getMessage().endswith("(errno EIO) (1,233 more like it in the last 61 s)")
    assert caplog.records[1].levelno == logging.ERROR


def test_another_files_or_errnos_or_operations_failure_is_logged_at_once(caplog: pytest.LogCaptureFixture) -> None:
    lines = RepeatedLines(every=60, clock=Clock())
    caplog.set_level(logging.INFO, logger="test.repeats")
    assert lines.failed(log, "read", gave_up("s3://b/shard-1.bin", 0), errno.EIO)
    assert lines.failed(log, "read", gave_up("s3://b/shard-2.bin", 0), errno.EIO)
    assert lines.failed(log, "read", gave_up("s3://b/shard-1.bin", 0), errno.ENOENT)
    assert lines.failed(log, "open", gave_up("s3://b/shard-1.bin", 0), errno.EIO)
    assert lines.failed(log, "read", RemoteUnavailable('"s3://b/shard-1.bin": no data within 5 s'), errno.EIO)
    assert len(caplog.records) == 5


def test_the_lines_remembered_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    lines = RepeatedLines(every=60, kept=10, clock=Clock())
    for i in range(1000):
        lines.failed(log, "read", gave_up(f"s3://b/f{i}.bin", 0), errno.EIO)
    assert len(lines._shown) == 10
    assert lines.failed(log, "read", gave_up("s3://b/f0.bin", 0), errno.EIO), "a forgotten failure is shown again"


def test_a_tight_loop_of_failures_is_paused_more_and_more_up_to_the_cap() -> None:
    loop, now = FailureLoop(), 0.0
    pauses = []
    for _ in range(FREE_FAILURES + 20):
        pause = loop.pause(now)
        pauses.append(pause)
        now += pause + 0.0001  # the kernel asks again at once
    assert pauses[:FREE_FAILURES] == [0.0] * FREE_FAILURES, "the first failures of a read wait"
    grown = pauses[FREE_FAILURES:]
    assert grown[0] > 0 and grown == sorted(grown)
    assert grown[-1] == PAUSE_MAX_S


def test_failures_a_user_retries_now_and_then_are_never_paused() -> None:
    loop, now = FailureLoop(), 0.0
    for _ in range(100):
        assert loop.pause(now) == 0.0
        now += LOOP_GAP_S * 2
    loop = FailureLoop()
    for _ in range(FREE_FAILURES + 5):  # a loop, paused...
        now += loop.pause(now)
    assert loop.pause(now + 1.0) == 0.0, "...and a read a second later is answered at once"


def test_a_files_loop_goes_on_across_its_handles_and_ends_with_a_read_that_succeeds() -> None:
    """A program that opens, reads (fails) and closes in a loop gets a new handle each time: the pause is the
    file's, so it waits as one handle's loop does; another file's first failures are answered at once."""
    loops, now = FailureLoops(), 0.0
    for _ in range(FREE_FAILURES):
        assert loops.pause("victim", now) == 0.0
        now += 0.001  # a close, an open, a read
    assert loops.pause("victim", now) > 0, "the loop was not paused"
    assert [loops.pause("other", now) for _ in range(FREE_FAILURES)] == [0.0] * FREE_FAILURES
    loops.ended("victim")  # a read of it succeeded
    assert loops.pause("victim", now) == 0.0
    loops.ended("never failed")


def test_the_files_kept_in_a_loop_are_bounded() -> None:
    loops = FailureLoops(kept=3)
    for i in range(10):
        loops.pause(i, 0.0)
    assert len(loops) == 3
