"""A thread that cannot be started (a cgroup's pids.max reached, ulimit -u) is
a limit that passes: requests that need one fail with EAGAIN (reads: EIO),
with one log line and no traceback; what must be cleaned up (the download's store lock,
its resume record) is, and once threads can be had again every file reads
right and nothing stays `downloading`.

Thread starts are refused through trio's thread cache (support/threadlimit.py).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

import pyfuse3
import pytest
from test_operations import CTX, ops_for, walk

from lazyfs import storespace
from lazyfs.fetch import Fetcher
from lazyfs.inodes import ROOT_INODE
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote
from support.threadlimit import ThreadLimit

MiB = 1024 * 1024


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch) -> ThreadLimit:
    return ThreadLimit(monkeypatch)


async def errno_of(call: Any) -> int:
    try:
        await call
    except pyfuse3.FUSEError as e:
        return e.errno
    return 0


async def read_all(ops: Any, ino: int, size: int) -> bytes:
    info = await ops.open(ino, os.O_RDONLY, CTX)
    try:
        out = b""
        while len(out) < size:
            out += bytes(await ops.read(info.fh, len(out), min(MiB, size - len(out))))
        return out
    finally:
        await ops.release(info.fh)


@trio_test
async def test_no_thread_to_start_fails_requests_with_eagain_and_every_file_works_once_one_can_be(
        remote: FakeRemote, stores, limit: ThreadLimit, caplog: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG, logger="lazyfs")
    monkeypatch.setattr(storespace, "FRESH_S", 0.0)  # the stats file's store size is asked for at each read
    big, small = os.urandom(3 * MiB + 12345), os.urandom(50_000)
    remote.put(BUCKET, "m/big.bin", big)
    remote.put(BUCKET, "m/small.json", small)
    gate = remote.gate("m/big.bin")  # the download's first GETs wait in their threads
    fetcher = Fetcher(remote, stores(), fetch_config(read_deadline=5.0))
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        big_ino = (await walk(ops, "m", "big.bin")).st_ino
        small_ino = (await walk(ops, "m", "small.json")).st_ino
        info = await ops.open(big_ino, os.O_RDONLY, CTX)
        await wait_for(lambda: gate.waiting, "the download's first GET")
        obj = fetcher.downloads()[0].obj

        limit.on = True
        gate.release()  # what is left of the file (its next requests, its verification) needs threads
        async def read_end() -> int:
            return await errno_of(ops.read(info.fh, len(big) - 4096, 4096))
        assert await read_end() in (0, errno.EIO)  # (EAGAIN would cut Python's f.read() short)
        await wait_for(lambda: not fetcher.downloads(), "the download's end")
        assert await read_end() in (0, errno.EIO)  # (EAGAIN would cut Python's f.read() short)
        assert await errno_of(ops.open(small_ino, os.O_RDONLY, CTX)) == errno.EAGAIN  # its store probe's thread
        # The stats are answered from memory: no thread needed.
        status = await ops.lookup(ROOT_INODE, b".lazyfs", CTX)
        stats_ino = (await ops.lookup(status.st_ino, b"stats.json", CTX)).st_ino
        stats = await ops.open(stats_ino, os.O_RDONLY, CTX)
        assert bytes(await ops.read(stats.fh, 0, 1 << 20)) == b"{}\n"  # (ops_for's stats file)
        await ops.release(stats.fh)
        await ops.release(info.fh)
        assert limit.refused > 0
        # The download's store lock is given back, thread or not: no open may
        # take this process's own lock for "another lazyfs process".
        await wait_for(lambda: not fetcher.runner.unlocking, "the lock given back", timeout=15)
        assert not fetcher.store.partials.downloading(obj)

        limit.on = False
        assert await read_all(ops, big_ino, len(big)) == big
        assert await read_all(ops, small_ino, len(small)) == small
        await wait_for(lambda: not fetcher.downloads() and not fetcher.runner.unlocking, "the downloads' end")
        for ino in (big_ino, small_ino):
            assert await ops.getxattr(ino, b"user.lazyfs.state", CTX) == b"cached"
        assert not fetcher.store.partials.downloading(obj)

    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r for r in records if r.levelno >= logging.ERROR or r.exc_info] == [], records
    said = [r for r in records if "cannot start a thread" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in records]
    assert "EAGAIN" in said[0].getMessage() and "pids.max" in said[0].getMessage()


@trio_test
async def test_a_store_lock_is_given_back_when_its_thread_cannot_start(
        remote: FakeRemote, stores, limit: ThreadLimit) -> None:
    """A download's end gives its lock back in a store thread; when none can
    be had, the part that cannot wait is done on the trio thread: the lock's
    descriptor closed.  Not done, the version stayed "downloaded by another
    lazyfs process" for the rest of the mount's life (its reads EIO)."""
    remote.put(BUCKET, "m/w.bin", os.urandom(300_000))
    obj = next(o for o in remote.list_some(BUCKET, "m/")[0] if o.key == "m/w.bin")
    gate = remote.gate("m/w.bin")
    fetcher = Fetcher(remote, stores(), fetch_config(read_deadline=5.0))
    async with running(fetcher):
        dl = await fetcher.acquire(obj)
        await wait_for(lambda: gate.waiting, "the GET")
        limit.on = True
        gate.release()  # its verification finds no thread: the download fails, its lock is given back
        await wait_for(lambda: dl.finished.is_set() and not fetcher.runner.unlocking, "the lock given back",
                       timeout=15)
        assert not fetcher.store.partials.downloading(obj)
        assert getattr(dl.error, "errno", None) == errno.EAGAIN
        limit.on = False
        again = await fetcher.acquire(obj)
        assert type(again).__name__ != "ForeignDownload"
