"""The warning for a file larger than the whole cache budget says how the two
differ, even when they round to the same MiB (an independent test saw
"(300.0 MiB) is larger than the cache budget (300.0 MiB)")."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lazyfs.budget import Budget
from lazyfs.namespace import RemoteObject
from support.budgetkit import UNIT, Engine, put
from support.enginekit import BUCKET, trio_test, wait_for
from support.fakeremote import FakeRemote


def _obj(size: int) -> RemoteObject:
    return RemoteObject(bucket=BUCKET, key="big/mid.bin", size=size, etag="e" * 32, mtime_ns=0)


@trio_test
async def test_a_file_one_byte_over_the_budget_is_told_apart_by_its_bytes(caplog: pytest.LogCaptureFixture,
                                                                           stores) -> None:
    budget = Budget(stores(), max_bytes=300 * 2**20 - 1)
    with caplog.at_level(logging.WARNING, logger="lazyfs.budget"):
        assert await budget.reserve(_obj(300 * 2**20)) is False
    line = caplog.messages[-1]
    assert "(300.0 MiB (314,572,800 bytes)) is larger than the cache budget (300.0 MiB (314,572,799 bytes))" in line


@trio_test
async def test_sizes_that_differ_in_mib_are_said_in_mib_alone(caplog: pytest.LogCaptureFixture, stores) -> None:
    budget = Budget(stores(), max_bytes=200 * 2**20)
    with caplog.at_level(logging.WARNING, logger="lazyfs.budget"):
        assert await budget.reserve(_obj(300 * 2**20)) is False
    assert "(300.0 MiB) is larger than the cache budget (200.0 MiB): serving it without keeping it" \
        in caplog.messages[-1]


def test_a_shard_larger_than_the_budget_is_not_fetched_ahead_for_that_reason(caplog: pytest.LogCaptureFixture,
                                                                             stores) -> None:
    """It said "no room for it beside the files in use (0.0 MiB) and the
    downloads in flight (0.0 MiB)": the reason is its size."""
    budget = Budget(stores(), max_bytes=20 * 2**20)
    with caplog.at_level(logging.INFO, logger="lazyfs.budget"):
        assert budget.room_ahead(_obj(24 * 2**20)) is False
    assert "not fetched ahead: larger than the cache budget (20.0 MiB), it is not kept" in caplog.messages[-1]


@trio_test
async def test_a_file_larger_than_the_budget_is_warned_of_once(caplog: pytest.LogCaptureFixture, stores) -> None:
    """Each open of it reserves again: a WARNING at each open, before."""
    budget = Budget(stores(), max_bytes=20 * 2**20)
    with caplog.at_level(logging.WARNING, logger="lazyfs.budget"):
        for _ in range(3):
            assert await budget.reserve(_obj(24 * 2**20)) is False
    assert len(caplog.messages) == 1


@trio_test
async def test_a_next_shard_already_in_the_store_needs_no_room(caplog: pytest.LogCaptureFixture, stores) -> None:
    """It was refused ("not fetched ahead: no room ...") and served the next
    moment from the store with no download: its own bytes were counted
    twice, once as the store's and once as a download's."""
    budget = Budget(stores(), max_bytes=30 * 2**20)
    shard = _obj(24 * 2**20)
    reading = RemoteObject(bucket=BUCKET, key="big/first.bin", size=10 * 2**20, etag="f" * 32, mtime_ns=0)
    for obj in (shard, reading):
        budget.linked(obj)  # counted as in the store (fetched files)
    budget.use(reading.key)  # the shard a loader reads
    with caplog.at_level(logging.INFO, logger="lazyfs.budget"):
        assert budget.room_ahead(shard) is True
    assert not [m for m in caplog.messages if "not fetched ahead" in m]


@trio_test
async def test_a_next_shard_complete_as_a_prebaked_copy_needs_no_room(
        caplog: pytest.LogCaptureFixture, remote: FakeRemote, stores, tmp_path: Path) -> None:
    """A copy the budget does not count (prebaked, or baked): "not fetched
    ahead: no room" was said of it, just before it was served with no
    download.  Now nothing is said of it; of a shard with no copy, as before."""
    (held, held_data), (nxt, nxt_data) = put(remote, "m/a.bin", 3 * UNIT // 2), put(remote, "m/b.bin", UNIT)
    other, _ = put(remote, "m/c.bin", UNIT)
    root = tmp_path / "store"
    (root / "m").mkdir(parents=True)
    (root / "m/b.bin").write_bytes(nxt_data)  # copied in by an admin: prebaked
    e = Engine(remote, stores(), root, max_bytes=2 * UNIT)
    caplog.set_level(logging.DEBUG, logger="lazyfs.budget")
    async with e.running():
        fh = await e.read_whole(held, held_data)
        await e.settled()
        e.fetcher.warm(nxt)
        e.fetcher.warm(other)  # no copy: refused, and said
        await wait_for(lambda: [m for m in caplog.messages if "not fetched ahead" in m and "c.bin" in m],
                       "the refusal of the file with no copy")
        await wait_for(lambda: [m for m in caplog.messages if "b.bin" in m], "the look at the prebaked copy")
        assert not [m for m in caplog.messages if "b.bin" in m and "no room" in m], caplog.messages
        assert await e.read_whole(nxt, nxt_data)
        e.handles.release(fh)
    assert remote.gets(nxt.key) == [] and remote.gets(other.key) == []


@trio_test
async def test_a_file_removed_by_hand_is_neither_a_warning_nor_counted_as_evicted(
        caplog: pytest.LogCaptureFixture, remote: FakeRemote, stores, tmp_path: Path) -> None:
    """An operator removed a fetched file from the store; the next eviction
    logged `could not evict "h/a.bin" from the store: No such file or
    directory` (a WARNING) and then `evicted 1 least recently used files
    (0.0 MiB)`: one it did not evict."""
    (a, a_data), (b, b_data), (c, c_data) = (put(remote, f"h/{k}.bin", UNIT) for k in "abc")
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT)
    async with e.running():
        await e.cached(a, a_data)
        await e.cached(b, b_data)
        (tmp_path / "store/h/a.bin").unlink()
        with caplog.at_level(logging.DEBUG, logger="lazyfs"):
            await e.cached(c, c_data)  # a.bin, least recently used, goes first
            await wait_for(lambda: e.budget.used == 2 * UNIT, "the budget to forget a.bin")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert e.budget.evicted_files == 0 and e.budget.evicted_bytes == 0
    assert not [m for m in caplog.messages if "evicted" in m and "least recently used" in m], caplog.text
    assert e.kept() == {"h/b.bin", "h/c.bin"}
