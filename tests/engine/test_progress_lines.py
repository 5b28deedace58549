"""`downloading ... %` lines only where progress means something (progress.py).

A tester's burst of 500 cold opens of small files logged 430 lines such as
`downloading "s3://bkt/m/d5/f245.bin": 100% (0.0 of 0.0 MiB, 0.0 MB/s)` in a
minute: each file had queued for a connection longer than the line's
interval, then arrived in one piece, and its line read as a file stuck at
100%.  A large file arriving slowly while its reader waits still says how far
it is, and says when it is all in and being checked.  The interval (5 s) is
made 50 ms here; the GETs are slowed so that queueing and arriving both take
several intervals.
"""

from __future__ import annotations

import logging
import os
import re
import time

import pytest
import trio

from lazyfs import progress
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from support.enginekit import BUCKET, fetch_config, running, trio_test
from support.fakeremote import FakeRemote

BLOCK = 256 * 1024
EVERY_S = 0.05


@pytest.fixture(autouse=True)
def short_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "EVERY_S", EVERY_S)


def slow_gets(remote: FakeRemote, seconds: float) -> None:
    remote.on_get.append(lambda call: time.sleep(seconds))  # in the GET's network thread, as a slow link


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloading ")]


@trio_test
async def test_a_burst_of_small_files_logs_no_progress_lines(remote: FakeRemote, stores,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lazyfs")
    objs = [remote.put(BUCKET, f"m/d5/f{i:03d}.bin", os.urandom(20_000 + i)) for i in range(24)]
    slow_gets(remote, 2 * EVERY_S / 3)  # 24 GETs two at a time: the last ones queue for 8 intervals
    fetcher = Fetcher(remote, stores(), fetch_config(part_size=BLOCK, max_connections=2))
    async with running(fetcher):
        handles = Handles(fetcher)

        async def read(obj) -> None:  # type: ignore[no-untyped-def]
            fh = await handles.open(obj)
            assert len(await handles.read(fh, 0, obj.size)) == obj.size
            handles.release(fh)

        async with trio.open_nursery() as readers:
            for obj in objs:
                readers.start_soon(read, obj)
    assert len([c for c in remote.calls if c.op == "GET"]) == len(objs)
    assert progress_lines(caplog) == []


@trio_test
async def test_a_large_file_arriving_slowly_says_how_far_it_is_then_that_it_is_checked(
        remote: FakeRemote, stores, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lazyfs")
    obj = remote.put(BUCKET, "m/model.bin", os.urandom(24 * BLOCK))
    slow_gets(remote, EVERY_S / 2)  # a block each time: two a line
    fetcher = Fetcher(remote, stores(), fetch_config(part_size=BLOCK, max_connections=1))
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        assert len(await handles.read(fh, 0, obj.size)) == obj.size  # a reader waits for all of it
        handles.release(fh)
    lines = progress_lines(caplog)
    percents = [int(m.group(1)) for line in lines if (m := re.search(r": (\d+)% \(", line))]
    assert percents and all(0 < p < 100 for p in percents) and percents == sorted(percents), lines
    assert re.fullmatch(rf'downloading "{obj.uri}": all 6.0 MiB in \([\d.]+ MB/s\); checking it before publishing',
                        lines[-1]), lines
    assert len(lines) == len(percents) + 1, lines
