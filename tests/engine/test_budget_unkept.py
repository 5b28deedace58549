"""A file larger than the cache budget (--cache-max-size) is streamed
through a download that is not kept: it serves its readers and ends with the
last of them, its temporary file removed.  It used to go on to the last
byte after a 1-byte read and a close, be verified, and be thrown away: the
whole object fetched on every open, and a temporary file of its full size
(several times the budget) left filling while nobody had it open."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from lazyfs.download import Download
from support.budgetkit import UNIT, Engine, put, quick
from support.enginekit import trio_test, wait_for
from support.fakeremote import FakeRemote

SIZE = 32 * UNIT  # 8 MiB against a budget of 2 blocks


def leftovers(root: Path) -> list[str]:
    tmp = root / ".lazyfs" / "tmp"
    return sorted(n for n in (p.name for p in tmp.iterdir()) if n.endswith((".part", ".json")))


@trio_test
@quick
async def test_a_short_read_of_a_file_larger_than_the_budget_ends_its_download_at_the_close(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    big, data = put(remote, "m/huge.bin", SIZE)
    gate = remote.gate(big.key, UNIT)  # every request past the first block waits until the close
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT, max_connections=2)
    async with e.running():
        fh = await e.handles.open(big)
        [dl] = e.fetcher.downloads()
        assert isinstance(dl, Download) and not dl.keep
        assert bytes(await e.handles.read(fh, 0, 1)) == data[:1]
        await wait_for(lambda: gate.waiting > 0, "the sweep's next request")
        e.handles.release(fh)
        requests = len(remote.gets(big.key))
        gate.release()
        await dl.finished.wait()
        await wait_for(lambda: dl.pins == 0, "its requests to stop")
        await trio.sleep(0.2)  # (time for requests it should not send)
        assert not e.fetcher.downloads()
        assert not dl.complete and dl.verified == "", "verified bytes nobody reads"
        assert len(remote.gets(big.key)) == requests, "requests sent after the last close"
        # The first block, and at most a piece of each request in flight at the close.
        assert e.fetcher.runner.bytes_from_s3 <= 4 * UNIT < SIZE
        await wait_for(lambda: not leftovers(tmp_path / "store"), "its temporary file to be removed", timeout=3)
        assert e.budget.reserved == 0 and e.budget.used == 0
        # The next open starts afresh and gets every byte it reads.
        fh = await e.handles.open(big)
        assert bytes(await e.handles.read(fh, SIZE - 10, 10)) == data[-10:]
        e.handles.release(fh)
    assert e.kept() == set()


@trio_test
@quick
async def test_an_unkept_download_goes_on_while_another_handle_reads_it(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    """Only the last close ends it: a second reader reads on to the end."""
    big, data = put(remote, "m/huge.bin", SIZE)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT, max_connections=2)
    async with e.running():
        first = await e.handles.open(big)
        second = await e.handles.open(big)
        assert bytes(await e.handles.read(first, 0, 1)) == data[:1]
        e.handles.release(first)
        assert bytes(await e.handles.read(second, 0, SIZE)) == data
        e.handles.release(second)
    assert e.kept() == set()


@trio_test
@quick
async def test_a_file_the_budget_keeps_is_downloaded_whole_after_a_short_read_and_close(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    """A file that is kept is for the store too: its download goes on."""
    obj, data = put(remote, "m/small.bin", 4 * UNIT)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=8 * UNIT, max_connections=2)
    async with e.running():
        fh = await e.handles.open(obj)
        [dl] = e.fetcher.downloads()
        assert bytes(await e.handles.read(fh, 0, 1)) == data[:1]
        e.handles.release(fh)
        await dl.finished.wait()
        assert dl.complete and dl.error is None
        await e.settled()
    assert e.kept() == {obj.key}


@trio_test
@quick
async def test_a_whole_file_open_of_a_file_larger_than_the_budget_downloads_it_once(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    """`--whole-file-open always` (or a shard of a checkpoint a loader walks)
    and a file the budget cannot keep.  The open waited for the whole file,
    which is never published (not kept), then looked for the copy, found
    none and downloaded it a second time to stream it: twice the file for
    one `sha256sum`.  Such an open does not wait for the whole file now: it
    streams it, once."""
    big, data = put(remote, "m/huge.bin", SIZE)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT, whole_file_open="always")
    e.handles.passes_through = lambda: True
    async with e.running():
        fh = await e.read_whole(big, data)
        e.handles.release(fh)
        await e.settled()
    assert sum(c.end - c.start for c in remote.gets(big.key)) == SIZE, "downloaded more than once"
    assert e.kept() == set()


@trio_test
@quick
async def test_an_open_right_after_the_stop_does_not_follow_its_own_lock(remote: FakeRemote, stores, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The stopped download's store lock is given back in a worker thread; an
    open of the file in that window found the lock held (by this process)
    and said it was "being downloaded by another lazyfs process on this
    store; following it", then "the process downloading it is gone": with
    one process.  It waits for its own lock now."""
    big, data = put(remote, "m/huge.bin", SIZE)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT)
    caplog.set_level(logging.INFO, logger="lazyfs")
    async with e.running():
        for _ in range(3):
            fh = await e.handles.open(big)
            assert bytes(await e.handles.read(fh, 0, 1)) == data[:1]
            e.handles.release(fh)  # stops the download; its lock goes back in a thread
        assert not e.fetcher._foreign
    assert "another lazyfs process" not in caplog.text


@trio_test
@quick
async def test_an_open_of_a_file_larger_than_the_budget_fetches_nothing_until_a_read_asks(
        remote: FakeRemote, stores, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every open of such a file starts a new download, and the kernel may
    answer all its reads from its page cache (a tester's four `sha256sum`s
    of a 39 MiB file with a 30 MiB budget sent 138 MiB, nearly all of it
    after the first, while the page cache held the whole file).  Its sweep
    waits for a first read now: an open and a close with no read in
    between fetch nothing and log nothing."""
    big, data = put(remote, "m/huge.bin", SIZE)
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT, max_connections=2)
    caplog.set_level(logging.INFO, logger="lazyfs")
    async with e.running():
        for _ in range(3):
            fh = await e.handles.open(big)
            await trio.sleep(0.2)  # (time for requests it should not send)
            assert not remote.gets(big.key), "fetched before any read asked"
            e.handles.release(fh)
        assert "its download stopped" not in caplog.text
        fh = await e.handles.open(big)  # a read asks: the sweep follows it
        assert bytes(await e.handles.read(fh, 0, SIZE)) == data
        e.handles.release(fh)
        await e.settled()
    assert e.kept() == set()


@trio_test
@quick
async def test_a_complete_unkept_download_still_read_is_never_resumed_by_the_next_open(
        remote: FakeRemote, stores, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its resume record was saved partway (it is never saved at the end), and
    its files stay in tmp/ while a reader holds it: the next open resumed it
    ("resuming download, 1 of 40 blocks already on disk", a tester saw), and
    fetched again what the stale record missed into the file the first reader
    was still reading; that reader's close then removed the second
    download's files.  It is never resumed now: the next open starts afresh."""
    big, data = put(remote, "m/huge.bin", SIZE)
    gate = remote.gate(big.key, SIZE // 2)  # held at half-way until its resume record names some blocks
    e = Engine(remote, stores(), tmp_path / "store", max_bytes=2 * UNIT, max_connections=2)
    caplog.set_level(logging.INFO, logger="lazyfs")
    async with e.running():
        first = await e.handles.open(big)
        [dl] = e.fetcher.downloads()
        reading = trio.Event()

        async def read_all() -> None:
            assert bytes(await e.handles.read(first, 0, SIZE)) == data
            reading.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await wait_for(lambda: any(n.endswith(".json") for n in leftovers(tmp_path / "store")),
                           "its resume record", timeout=10)
            gate.release()
        await reading.wait()
        await dl.finished.wait()
        second = await e.handles.open(big)  # the first handle still open
        assert bytes(await e.handles.read(second, 0, SIZE)) == data
        e.handles.release(first)
        e.handles.release(second)
        await e.settled()
    assert "resuming download" not in caplog.text
    assert e.kept() == set()
