"""The cache budget (--cache-max-size) never takes a file from someone using
it, and counts every fetched file in the store.

A loader walking a checkpoint larger than the budget downloads each shard
once: a shard an open is waiting for is not evicted the moment it is
published, and the next shard is fetched ahead only when the budget has room
for it beside the shard being read (before, a 3-shard load with a budget of
one and a half shards downloaded 2.3 times the model).  A file linked back
from the content index counts like a download's (before, it was on disk but
never counted, so never evicted), and a store left over the budget by files
all held open comes back within it when the last of them is closed, not at
the next publish."""

from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from lazyfs.namespace import RemoteObject
from lazyfs.stats import STATS
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

    async def published_then_told(obj: RemoteObject, unopened: bool = False) -> None:
        try:
            await published(obj, unopened)
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


@trio_test
@quick
async def test_a_file_linked_from_another_paths_bytes_counts(remote: FakeRemote, stores, tmp_path: Path) -> None:
    """A new version folder shares a file with the old one: the open links
    it, and the budget counts it as the file it now is in the store."""
    old, data = put(remote, "m/v1/a.bin", UNIT)
    new = remote.put(old.bucket, "m/v2/a.bin", data)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=4 * UNIT)
    async with e.running():
        await e.cached(old, data)
        linked = STATS.linked_files
        await e.cached(new, data)
        assert STATS.linked_files == linked + 1 and remote.gets(new.key) == []
        assert e.budget.used == e.fetched_bytes() == 2 * UNIT


@trio_test
@quick
async def test_a_file_evicted_as_an_open_links_it_back_is_counted(remote: FakeRemote, stores, tmp_path: Path,
                                                                   monkeypatch: Any) -> None:
    """The eviction of a closed file has unlinked its path when an open of it
    finds its content-index entry, which the eviction then removes: the open
    copies the bytes back from the entry it holds open.  The file is in the
    store again, so the budget counts it, and evicts it again once it is
    closed (one file's room)."""
    (a, a_data), (b, b_data) = put(remote, "m/a.bin", UNIT), put(remote, "m/b.bin", UNIT)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=UNIT)
    index = e.store.index
    unlinked, opened, dropped = threading.Event(), threading.Event(), threading.Event()
    drop_if_unused, open_entry = index.drop_if_unused, index.open

    def drop_later(etag: str, size: int) -> None:  # the eviction thread, a's path unlinked
        if etag == a.etag:
            unlinked.set()
            assert opened.wait(5), "the open never looked at the content index"
        drop_if_unused(etag, size)
        dropped.set()

    def open_before_the_drop(obj: RemoteObject) -> int | None:  # the open's probe thread
        fd = open_entry(obj)
        if obj.key == a.key and unlinked.is_set():
            opened.set()
            assert dropped.wait(5), "the eviction never ended"
        return fd

    monkeypatch.setattr(index, "drop_if_unused", drop_later)
    monkeypatch.setattr(index, "open", open_before_the_drop)
    async with e.running():
        await e.cached(a, a_data)
        async with trio.open_nursery() as nursery:
            fhs: list[int] = []

            async def read(obj: RemoteObject, data: bytes) -> None:
                fhs.append(await e.read_whole(obj, data))

            nursery.start_soon(read, b, b_data)  # its room evicts a
            await wait_for(unlinked.is_set, "the eviction of a")
            nursery.start_soon(read, a, a_data)
        await e.settled()
        assert e.kept() == {a.key, b.key} and len(remote.gets(a.key)) == 1, "a was not linked back"
        assert e.budget.used == e.fetched_bytes() == 2 * UNIT, "a file in the store is not counted"
        for fh in fhs:
            e.handles.release(fh)
        await wait_for(lambda: e.fetched_bytes() <= UNIT, "the store to come back within the budget", timeout=3)
        await e.settled()
        assert e.budget.used == e.fetched_bytes() == UNIT


@trio_test
@quick
async def test_a_store_over_the_budget_comes_back_within_it_when_the_last_handle_closes(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    """A loader opens every file at once (as the Run:ai streamer opens every
    shard): their downloads pass the budget, and nothing can go while they
    are open.  Once the last handle of a file is closed, the least recently
    used closed files go: no publish is needed for that."""
    files = [put(remote, f"m/{i}.bin", UNIT) for i in range(3)]
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=3 * UNIT // 2)
    async with e.running():
        fhs = [await e.read_whole(obj, data) for obj, data in files]
        await e.settled()
        assert e.budget.used == e.fetched_bytes() == 3 * UNIT and e.budget.evicted_files == 0
        e.handles.release(fhs[0])
        await wait_for(lambda: e.fetched_bytes() == 2 * UNIT, "the closed file to go")
        for fh in fhs[1:]:
            e.handles.release(fh)
        await wait_for(lambda: e.fetched_bytes() <= e.budget.max_bytes, "the store to come back within the budget")
        await e.settled()
        assert e.kept() == {files[2][0].key}, "not the least recently used closed files went"
        assert e.budget.used == e.fetched_bytes() == UNIT


@trio_test
@quick
async def test_a_prefetch_waits_for_the_files_in_use_to_leave_room(remote: FakeRemote, stores, tmp_path: Path,
                                                                   caplog: Any) -> None:
    """A reader holds a file open that fills most of the budget, and a
    prefetch comes to a file that does not fit beside it.  Before, the
    prefetch downloaded it at once (nothing was in flight), and its publish
    evicted it again (the only closed file): downloaded for nothing.  Now it
    waits, with one line saying why, until the reader closes its file; then
    the closed file makes way and the prefetched one is kept, downloaded
    once.  A prefetch of the file the reader holds is not held up by it."""
    import logging

    from lazyfs.prefetch import Prefetcher, Progress

    (held, held_data), (nxt, _) = put(remote, "m/a.bin", 3 * UNIT // 2), put(remote, "m/b.bin", UNIT)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT)
    caplog.set_level(logging.INFO, logger="lazyfs.budget")
    async with e.running(), trio.open_nursery() as nursery:
        fh = await e.read_whole(held, held_data)
        await e.settled()
        done: list[Progress] = []

        async def prefetch() -> None:
            done.append(await Prefetcher(e.fetcher).run([held, nxt]))

        nursery.start_soon(prefetch)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert not done and remote.gets(nxt.key) == [], "fetched while the file in use left no room for it"
        assert "waits for room" in caplog.text
        e.handles.release(fh)
        await wait_for(lambda: done, "the prefetch to end")
        await e.settled()
    assert done[0].done_files == 2 and not done[0].failed
    assert downloaded(remote, nxt) == nxt.size and downloaded(remote, held) == held.size
    assert e.kept() == {nxt.key}
    assert e.budget.used == e.fetched_bytes() == nxt.size


@trio_test
@quick
async def test_a_prefetch_never_evicts_what_it_fetched_before_anyone_opened_it(remote: FakeRemote, stores,
                                                                               tmp_path: Path, caplog: Any) -> None:
    """A prefetch of more than the budget (three files, room for two).
    Before, it fetched all three, and the third's room was made by evicting
    the first, fetched moments before and never opened (the tester's
    config.json and tokenizer.json went for a later shard).  Now the first
    two are kept and the third is left to the readers, with one line and a
    count in the summary; a reader who opens it fetches it then, and the
    least recently used file makes way.  Nothing is downloaded twice, and
    nothing is downloaded only to be thrown away unopened."""
    import logging

    from lazyfs.prefetch import Prefetcher, summary

    (a, _), (b, _), (c, c_data) = (put(remote, f"m/{n}.bin", UNIT) for n in "abc")
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT)
    caplog.set_level(logging.INFO, logger="lazyfs")
    async with e.running():
        progress = await Prefetcher(e.fetcher, concurrent_files=1).run([a, b, c])
        await e.settled()
        assert progress.done_files == 2 and progress.crowded_files == 1 and not progress.failed
        assert "1 left to the readers (the cache budget is full)" in summary(progress)
        assert "left to the readers" in caplog.text
        assert remote.gets(c.key) == [] and e.budget.evicted_files == 0, \
            "a file prefetched and never opened was evicted for the next"
        assert e.kept() == {a.key, b.key}
        e.handles.release(await e.read_whole(c, c_data))
        await e.settled()
    assert [downloaded(remote, o) for o in (a, b, c)] == [UNIT] * 3
    assert e.kept() == {b.key, c.key}
    assert e.budget.used == e.fetched_bytes() == 2 * UNIT


@trio_test
@quick
async def test_a_file_not_fetched_ahead_is_said_once_per_load(remote: FakeRemote, stores, tmp_path: Path,
                                                            caplog: Any) -> None:
    """A loader's next shard does not fit beside the shard it holds open,
    and several places ask to fetch it ahead (the read-through, the whole
    open, an index).  Before, each asking logged its own "not fetched ahead"
    line (three within 100 ms for one shard); now one line says so, until a
    reader opens the file (the next load's refusal is said again), or the
    object changes.  The decision is the same each time: nothing fetched."""
    import logging

    (held, held_data), (nxt, _) = put(remote, "m/a.bin", 3 * UNIT // 2), put(remote, "m/b.bin", UNIT)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT)
    caplog.set_level(logging.INFO, logger="lazyfs.budget")

    def said() -> int:
        return sum("not fetched ahead" in r.getMessage() for r in caplog.records)

    async with e.running():
        fh = await e.read_whole(held, held_data)
        await e.settled()
        # (each line comes after a look at the store: said of a file with no copy on disk)
        for _ in range(3):
            e.fetcher.warm(nxt)
        await wait_for(lambda: said() == 1, "the refusal's line")
        assert remote.gets(nxt.key) == [], "fetched ahead where it does not fit beside the file in use"
        e.budget.use(nxt.key)  # a reader opens it (and gives up): the next load is told again
        e.budget.unuse(nxt.key)
        e.fetcher.warm(nxt)
        e.fetcher.warm(nxt)
        await wait_for(lambda: said() == 2, "the next load's refusal")
        changed, _ = put(remote, nxt.key, UNIT)  # another version of it: said for that one
        e.fetcher.warm(changed)
        e.fetcher.warm(changed)
        await wait_for(lambda: said() == 3, "the new version's refusal")
        await trio.sleep(0.2)
        assert said() == 3, "one refusal said more than once"
        e.handles.release(fh)
        await e.settled()
    assert remote.gets(nxt.key) == []
