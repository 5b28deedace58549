"""The cache budget (--cache-max-size) never takes a file from someone using
it.

A loader walking a checkpoint larger than the budget downloads each shard
once: a shard an open is waiting for is not evicted the moment it is
published, and the next shard is fetched ahead only when the budget has room
for it beside the shard being read (before, a 3-shard load with a budget of
one and a half shards downloaded 2.3 times the model)."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from lazyfs.namespace import RemoteObject
from support.budgetkit import UNIT, Engine, put, quick
from support.enginekit import trio_test, wait_for
from support.fakeremote import FakeRemote

KiB = 1024


def downloaded(remote: FakeRemote, obj: RemoteObject) -> int:
    """Bytes of `obj` its GETs asked for."""
    return sum(c.end - c.start for c in remote.gets(obj.key))


@pytest.mark.parametrize("whole_file_open", ["checkpoint", "never"])
@trio_test
@quick
async def test_a_checkpoint_larger_than_the_budget_is_downloaded_once(
        remote: FakeRemote, stores, tmp_path: Path, monkeypatch: Any, whole_file_open: str) -> None:
    """Three shards of four parts, a budget of one and a half shards: a loader
    opens the index, then reads each shard whole and closes it (whole-file
    opens, or reads as the bytes arrive).  It is slow: whatever is fetched
    ahead lands while it still reads a shard.  And a shard's publish gets
    to the budget before the open waiting for it looks at the store again
    (as in the run that downloaded the model 2.3 times).  Each shard is
    downloaded exactly once, and the budget counts what the store holds."""
    shards = [put(remote, f"m/model-0000{i}-of-00003.safetensors", 4 * UNIT) for i in (1, 2, 3)]
    index, index_data = put(remote, "m/model.safetensors.index.json", KiB)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=6 * UNIT, whole_file_open=whole_file_open)
    listed = [obj for obj, _ in shards]
    e.handles.passes_through = lambda: True
    e.handles.index_shards = lambda obj: listed if obj == index else []
    e.handles.next_shard = lambda obj: listed[listed.index(obj) + 1] if obj in listed[:-1] else None
    told: dict[str, trio.Event] = collections.defaultdict(trio.Event)
    published, acquire = e.budget.published, e.fetcher.acquire

    async def published_then_told(obj: RemoteObject) -> None:
        try:
            await published(obj)
        finally:
            told[obj.key].set()

    async def acquire_once_told(obj: RemoteObject, background: bool = False) -> Any:
        if remote.gets(obj.key) and e.fetcher.active(obj) is None:  # downloaded: its publish first
            await told[obj.key].wait()
        return await acquire(obj, background)

    warming = [0]  # fetches ahead between their start and their download's (Fetcher._warm)
    warm = e.fetcher._warm

    async def counted_warm(obj: RemoteObject) -> None:
        warming[0] += 1
        try:
            await warm(obj)
        finally:
            warming[0] -= 1

    async def landed_ahead() -> None:
        """Whatever is fetched ahead by now is in the store."""
        await e.settled()  # the shard being read is (its next one is fetched once it has nothing left to request)
        await trio.testing.wait_all_tasks_blocked()  # a fetch ahead just spawned has started
        await wait_for(lambda: not warming[0], "the fetches ahead to start their downloads")
        await e.settled()

    monkeypatch.setattr(e.budget, "published", published_then_told)
    monkeypatch.setattr(e.fetcher, "acquire", acquire_once_told)
    monkeypatch.setattr(e.fetcher, "_warm", counted_warm)
    async with e.running():
        e.handles.release(await e.read_whole(index, index_data))
        for obj, data in shards:
            fh = await e.handles.open(obj)
            for off in range(0, obj.size, UNIT):  # as a loader copies it, part by part
                if off == obj.size - UNIT:
                    await landed_ahead()  # a slow loader
                assert bytes(await e.handles.read(fh, off, UNIT)) == data[off:off + UNIT]
            e.handles.release(fh)
        await e.settled()
        assert {obj.key: downloaded(remote, obj) for obj in listed} == {obj.key: obj.size for obj in listed}, \
            f"a shard was downloaded twice ({e.budget.evicted_files} evictions)"
        assert e.budget.used == e.fetched_bytes() <= e.budget.max_bytes
