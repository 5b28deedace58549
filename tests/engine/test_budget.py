"""Issue 11.17 at the engine tier: the cache budget (--cache-max-size) never
overshoots.  Downloads in flight hold their room from the start (thirty-two
prefetches do not all count the same free space), a publish that overshoots
evicts least recently used closed files, a failed download gives its room
back, and a prefetch never downloads a file larger than the whole budget
(a reader still gets its bytes).

Each test drives a Fetcher with a Budget, as mount.py wires them, against the
in-memory object store; the budget's level is looked at whenever bytes are
about to arrive (each GET the dispatcher starts), never by the clock."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio
import trio.testing

from lazyfs.download import Download
from lazyfs.errors import RemoteUnavailable
from lazyfs.namespace import RemoteObject
from lazyfs.prefetch import Prefetcher, Progress, summary
from lazyfs.store import LocalCopy, Store
from support.budgetkit import UNIT, Engine, put, quick
from support.enginekit import BUCKET, running, trio_test, wait_for
from support.fakeremote import FakeRemote


@trio_test
@quick
async def test_a_prefetch_never_has_more_in_flight_than_the_budget(remote: FakeRemote, stores,
                                                                   tmp_path: Path) -> None:
    """Twelve files, a budget of four, thirty-two prefetch slots: at most four
    downloads are ever in flight, the level never passes the budget at any GET,
    and at the end four files are kept, each fetched once."""
    objs = [put(remote, f"m/{i:02}.bin", UNIT)[0] for i in range(12)]
    gates = [remote.gate(o.key) for o in objs]  # every GET parks until the test lets it go
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=4 * UNIT)
    async with running(e.fetcher), trio.open_nursery() as nursery:
        done: list[Progress] = []

        async def prefetch() -> None:
            done.append(await Prefetcher(e.fetcher, concurrent_files=32).run(objs))

        nursery.start_soon(prefetch)
        await wait_for(lambda: sum(g.waiting for g in gates) >= 4, "four GETs in flight")
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        in_flight = sorted(c.key for c in remote.gets())
        assert len(in_flight) == 4, f"{len(in_flight)} downloads started against a budget of 4: {in_flight}"
        assert e.budget.reserved == 4 * UNIT and e.budget.used == 0
        assert e.budget.in_flight == 4 * UNIT, "the eight waiting hold room they do not have"
        for g in gates:
            g.release()
        await wait_for(lambda: done, "the prefetch to end")
        await e.settled()
    progress = done[0]
    # The first four fill the budget; nobody opens them, so the other eight
    # are left to the readers (before, all twelve were fetched and the first
    # eight evicted unopened to make room for the next: test_budget_in_use.py).
    assert progress.done_files == 4 and progress.crowded_files == 8 and not progress.failed
    assert max(e.levels) <= 4 * UNIT, e.levels
    assert max(e.on_disk) <= 4 * UNIT, e.on_disk
    assert sorted(c.key for c in remote.gets()) == sorted(o.key for o in objs[:4]), "a file was fetched twice"
    assert e.kept() == {o.key for o in objs[:4]} and e.budget.used == 4 * UNIT and e.budget.reserved == 0
    assert e.budget.evicted_files == 0


@trio_test
@quick
async def test_a_prefetch_of_files_already_kept_evicts_nothing(remote: FakeRemote, stores,
                                                               tmp_path: Path) -> None:
    """A warm restart with a full cache: the prefetch finds every file local,
    holds no room for them, and so neither evicts nor downloads anything."""
    files = [put(remote, f"m/{i}.bin", UNIT) for i in range(3)]
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=3 * UNIT)
    async with running(e.fetcher):
        for obj, data in files:
            await e.cached(obj, data)
        gets = len(remote.gets())
        progress = await Prefetcher(e.fetcher).run([o for o, _ in files])
        await e.settled()
    assert progress.local_files == 3 and progress.done_files == 3
    assert len(remote.gets()) == gets and e.budget.evicted_files == 0
    assert e.kept() == {o.key for o, _ in files} and e.budget.used == 3 * UNIT


@trio_test
@quick
async def test_a_publish_over_the_budget_evicts_closed_files_least_recently_used_first(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    """Readers hold every kept file open, so a new file's room cannot be made
    when its download starts; by its publish two of them were closed.  The
    publish evicts the least recently used closed file, just enough to be
    back within the budget: never the open one (older still), never the
    prebaked copy (closed), never the new file a reader has open."""
    (c, c_data), (a, a_data), (b, b_data) = (put(remote, f"m/{k}.bin", UNIT) for k in "cab")
    d, d_data = put(remote, "m/d.bin", 2 * UNIT)
    p, p_data = put(remote, "m/p.bin", UNIT)
    store = stores()
    root = tmp_path / "store"
    (root / "m").mkdir()
    (root / "m/p.bin").write_bytes(p_data)  # copied in by an admin: prebaked, judged by its size
    e = Engine(remote, store, root, max_bytes=4 * UNIT)
    async with running(e.fetcher):
        fhs = {}
        for obj, data in ((c, c_data), (a, a_data), (b, b_data)):  # least recently used first
            fhs[obj.key] = await e.read_whole(obj, data)
            await e.settled()
        e.handles.release(await e.read_whole(p, p_data))  # closed: only being prebaked keeps it
        assert e.budget.used == 3 * UNIT
        gate = remote.gate(d.key)
        dl = await e.fetcher.acquire(d)
        assert isinstance(dl, Download) and dl.keep
        assert e.budget.evicted_files == 0, "evicted a file someone has open"
        assert e.budget.used + e.budget.reserved == 5 * UNIT  # over: nothing could go yet
        e.handles.release(fhs.pop(a.key))
        e.handles.release(fhs.pop(b.key))
        gate.release()
        fh = await e.read_whole(d, d_data)
        await e.settled()
        assert e.budget.used == 4 * UNIT and e.budget.reserved == 0
        assert e.budget.evicted_files == 1
        assert e.kept() == {"m/b.bin", "m/c.bin", "m/d.bin", "m/p.bin"}
        assert bytes(await e.handles.read(fhs[c.key], 0, UNIT)) == c_data
        for h in (fh, *fhs.values()):
            e.handles.release(h)
    assert (root / "m/p.bin").read_bytes() == p_data


@trio_test
@quick
async def test_a_failed_download_gives_its_room_back(remote: FakeRemote, stores, tmp_path: Path) -> None:
    """A download that fails (a reader's: its GET's connection reset; then a
    prefetch's: its GET refused) releases its reservation: the next download
    finds the room free and evicts nothing."""
    a, a_data = put(remote, "m/a.bin", UNIT)
    b, _ = put(remote, "m/b.bin", UNIT)
    c, _ = put(remote, "m/c.bin", UNIT)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT)
    async with running(e.fetcher):
        await e.cached(a, a_data)
        gate = remote.gate(b.key)
        dl = await e.fetcher.acquire(b)
        assert isinstance(dl, Download)
        await wait_for(lambda: gate.waiting, "b's GET in flight")
        assert e.budget.reserved == UNIT
        gate.fail()
        await dl.finished.wait()
        assert isinstance(dl.error, RemoteUnavailable)
        await e.settled()
        assert e.budget.reserved == 0 and e.budget.used == UNIT
        remote.fail_gets[b.key] = [RemoteUnavailable(f"{b.uri}: 503 Slow Down", bucket=BUCKET, key=b.key)]
        progress = await Prefetcher(e.fetcher, concurrent_files=1).run([b, c])  # b, then c
        await e.settled()
    assert progress.done_files == 1 and [uri for uri, _ in progress.failed] == [b.uri]
    assert e.budget.in_flight == 0
    assert e.budget.evicted_files == 0, "the failed download's room was still counted"
    assert e.kept() == {"m/a.bin", "m/c.bin"} and e.budget.used == 2 * UNIT


@trio_test
@quick
async def test_a_file_larger_than_the_budget_is_not_prefetched_but_a_reader_gets_it(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    """Prefetch skips it without a single GET and reports it; a reader who
    opens it gets every byte, streamed through a file that is not kept."""
    big, big_data = put(remote, "m/big.bin", 3 * UNIT)
    small = [put(remote, f"m/s{i}.bin", UNIT // 2)[0] for i in range(2)]
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT)
    async with running(e.fetcher):
        progress = await Prefetcher(e.fetcher).run([big, *small])
        await e.settled()
        assert remote.gets(big.key) == []
        assert progress.skipped_files == 1 and progress.done_files == 2 and not progress.failed
        assert "1 too large for the cache budget" in summary(progress)
        assert e.budget.used == UNIT and e.budget.reserved == 0

        fh = await e.read_whole(big, big_data)
        e.handles.release(fh)
        await e.settled()
        assert sum(c.end - c.start for c in remote.gets(big.key)) == big.size
        got = await e.fetcher.acquire(small[0])
        assert isinstance(got, LocalCopy)
        os.close(got.fd)
    assert e.kept() == {"m/s0.bin", "m/s1.bin"}, "the file larger than the budget was kept"
    assert e.budget.used == UNIT and e.budget.reserved == 0 and e.budget.evicted_files == 0


@trio_test
@quick
async def test_a_download_that_cannot_get_its_file_gives_its_room_back(remote: FakeRemote, stores, tmp_path: Path,
                                                                       monkeypatch: Any) -> None:
    """The store refuses the partial file (ENOSPC) after the room was
    reserved: the reader gets ENOSPC, and the room is free for the next file."""
    import errno

    from lazyfs import fetch
    from lazyfs.errors import StoreError

    (full, _), (small, small_data) = put(remote, "m/full.bin", UNIT), put(remote, "m/next.bin", UNIT)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=UNIT)
    real = fetch.open_partial_file

    def no_space(store: Store, obj: RemoteObject, block_size: int) -> Any:
        if obj.key == full.key:
            raise StoreError(f"{obj.uri}: cannot write it to the store: No space left on device", errno.ENOSPC)
        return real(store, obj, block_size)

    monkeypatch.setattr(fetch, "open_partial_file", no_space)
    async with running(e.fetcher):
        try:
            await e.handles.open(full)
            raise AssertionError("the open should have failed")
        except StoreError as err:
            assert err.errno == errno.ENOSPC
        assert e.budget.reserved == 0, "the failed start kept its room"
        await e.cached(small, small_data)
        await e.settled()
    assert e.kept() == {small.key} and e.budget.evicted_files == 0
