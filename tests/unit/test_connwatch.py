"""The watch on the kernel connection (connwatch.py), on a pipe: like
/dev/fuse, its write end is always writable and polls EPOLLERR once the other
side is gone.  The watch must wake for the error only, never for readiness."""

from __future__ import annotations

import logging
import os
import resource
from typing import Iterator

import pytest
import trio

from lazyfs import connwatch
from lazyfs.connwatch import ConnectionWatch


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_a_live_descriptor_is_not_gone_even_when_ready(pipe: tuple[int, int]) -> None:
    _, w = pipe
    watch = ConnectionWatch(w)  # writable all along: not reported
    try:
        assert not watch.gone()

        async def wait() -> bool:
            with trio.move_on_after(0.3):
                await watch.wait_gone()
                return True
            return False

        assert trio.run(wait) is False
    finally:
        watch.close()


def test_the_watch_wakes_once_the_other_side_is_gone(pipe: tuple[int, int]) -> None:
    r, w = pipe
    watch = ConnectionWatch(w)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, os.close, r)  # from elsewhere, while it waits
            with trio.fail_after(5):
                await watch.wait_gone()

    try:
        trio.run(main)
        assert watch.gone()
    finally:
        watch.close()


def test_requests_in_flight_are_abandoned_in_one_info_line(pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    r, w = pipe
    monkeypatch.setattr(connwatch, "fuse_descriptor", lambda: w)
    caplog.set_level(logging.INFO, "lazyfs.connwatch")

    async def main() -> bool:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as serving:
                nursery.start_soon(connwatch.abandon_when_gone, serving, lambda: 3)
                await trio.sleep(0.05)
                os.close(r)
                with trio.fail_after(5):
                    await trio.sleep_forever()  # pyfuse3's main loop, waiting on its handlers
            return serving.cancelled_caught

    assert trio.run(main) is True
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["3 requests in flight abandoned because the kernel connection was aborted "
                     "(no answer could reach it)"]


def test_no_watch_is_one_warning_line_and_the_mount_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    def refused() -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(connwatch, "fuse_descriptor", refused)
    assert ConnectionWatch.of_session() is None
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # whose limit ran out, and what it is
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("cannot watch the kernel connection (too many open files: the daemon's descriptor limit "
                           f"(ulimit -n / RLIMIT_NOFILE) is {limit}")
    assert line.endswith("): after `umount --force`, requests in flight end only at their deadline"), line
