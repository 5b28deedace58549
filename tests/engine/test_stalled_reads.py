"""A stalled read fails within --read-deadline, however often the kernel asks
again (gaveup.py): the retry of a read that gave up fails at once while no
bytes arrived for it, and readers wait as usual as soon as bytes arrive.
Driven by the engine's handles against a fake remote whose GETs stall on cue."""

from __future__ import annotations

import os

import pytest
import trio
from test_hardening import another_process_downloading  # the owner in another process, by hand

from lazyfs.coop import ForeignDownload
from lazyfs.download import Download
from lazyfs.errors import RemoteUnavailable
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote

BLOCK = 256 * 1024
DEADLINE = 1.0
AT_ONCE = 0.3  # well under a deadline, on a loaded machine


async def timed_failure(read) -> tuple[float, str]:  # type: ignore[no-untyped-def]
    """How long `read()` took to fail, and why."""
    started = trio.current_time()
    with pytest.raises(RemoteUnavailable) as info:
        await read()
    return trio.current_time() - started, str(info.value)


@trio_test
async def test_a_retry_fails_at_once_until_bytes_arrive_on_the_stalled_request(remote: FakeRemote,
                                                                                stores) -> None:
    data = os.urandom(8 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    stalled = remote.gate(obj.key, start=0, end=BLOCK)  # block 0's request gets no answer
    fetcher = Fetcher(remote, stores(), fetch_config(part_size=BLOCK, read_deadline=DEADLINE))
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        dl = handles._open[fh].download
        assert isinstance(dl, Download)
        took, why = await timed_failure(lambda: handles.read(fh, 0, 2 * BLOCK))  # readahead
        assert took >= DEADLINE * 0.9 and "within" in why
        took, why = await timed_failure(lambda: handles.read(fh, 4096, 4096))  # the kernel's retry of a page
        assert took < AT_ONCE, f"the retry waited {took:.2f} s for bytes that were not coming"
        assert "none has arrived since" in why
        # Bytes of another request: not the stalled block's, whose retry still fails at once.
        assert bytes(await handles.read(fh, 5 * BLOCK, 4096)) == data[5 * BLOCK:5 * BLOCK + 4096]
        took, _ = await timed_failure(lambda: handles.read(fh, 0, 4096))
        assert took < AT_ONCE
        stalled.release()  # the stalled request answers: its bytes clear the mark
        await wait_for(lambda: not dl.gave_up, "bytes on the stalled request")
        assert bytes(await handles.read(fh, 0, 4096)) == data[:4096]
        handles.release(fh)


@trio_test
async def test_a_read_a_deadline_later_waits_again(remote: FakeRemote, stores) -> None:
    """A mark lasts one deadline: a reader that comes later is not a retry."""
    obj = remote.put(BUCKET, "m/w.bin", os.urandom(4 * BLOCK))
    stalled = remote.gate(obj.key)
    fetcher = Fetcher(remote, stores(), fetch_config(part_size=BLOCK, read_deadline=DEADLINE))
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        await timed_failure(lambda: handles.read(fh, 0, 4096))
        await trio.sleep(DEADLINE)
        took, why = await timed_failure(lambda: handles.read(fh, 0, 4096))
        assert took >= DEADLINE * 0.9 and "within" in why
        stalled.release()
        handles.release(fh)


@trio_test
async def test_a_block_queued_behind_a_stall_waits_again_once_bytes_move(remote: FakeRemote, stores) -> None:
    """One connection, held by a stalled request: a reader of another block
    (waiting for a connection) gives up, and its retry fails at once: the
    same stall.  Once the stalled request moves, the queued block's next
    reader waits for it again, and gets it."""
    data = os.urandom(8 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    stalled = remote.gate(obj.key, start=0, end=BLOCK)
    later = remote.gate(obj.key, start=4 * BLOCK, end=5 * BLOCK)  # block 4's request, once it has a connection
    fetcher = Fetcher(remote, stores(), fetch_config(part_size=BLOCK, read_deadline=DEADLINE, max_connections=1))
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        dl = handles._open[fh].download
        assert isinstance(dl, Download)
        await wait_for(lambda: stalled.waiting, "the stalled request")
        took, _ = await timed_failure(lambda: handles.read(fh, 4 * BLOCK, 4096))
        assert took >= DEADLINE * 0.9
        took, _ = await timed_failure(lambda: handles.read(fh, 4 * BLOCK, 4096))
        assert took < AT_ONCE
        stalled.release()
        await wait_for(lambda: dl.covered(0, BLOCK), "the stalled block")
        assert not dl.covered(4 * BLOCK, 5 * BLOCK)

        async def answer_later() -> None:
            await wait_for(lambda: later.waiting, "block 4's request")
            await trio.sleep(0.2)
            later.release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_later)
            assert bytes(await handles.read(fh, 4 * BLOCK, 4096)) == data[4 * BLOCK:4 * BLOCK + 4096]
        handles.release(fh)


@trio_test
async def test_a_followers_retry_fails_at_once_until_the_owner_records_a_block(remote: FakeRemote,
                                                                                stores) -> None:
    """Another process downloads the file and records nothing new: a
    follower's retry fails at once; a new block of the owner's lets its
    readers wait again."""
    data = os.urandom(4 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    owner, lock, part = another_process_downloading(stores, obj, data, {0})
    follower = Fetcher(remote, stores(), fetch_config(read_deadline=DEADLINE))
    async with running(follower):
        handles = Handles(follower)
        fh = await handles.open(obj)
        took, _ = await timed_failure(lambda: handles.read(fh, 2 * BLOCK, 4096))
        assert took >= DEADLINE * 0.9
        took, why = await timed_failure(lambda: handles.read(fh, 2 * BLOCK, 4096))
        assert took < AT_ONCE and "none has arrived since" in why
        foreign = handles._open[fh].download
        assert isinstance(foreign, ForeignDownload)
        os.pwrite(part.fd, data[BLOCK:2 * BLOCK], BLOCK)
        part.save_state({0, 1})  # the owner moves: not yet the block we want
        await wait_for(lambda: 1 in foreign._done, "the follower to see block 1")

        async def owner_brings_block_2() -> None:
            await trio.sleep(0.3)
            os.pwrite(part.fd, data[2 * BLOCK:3 * BLOCK], 2 * BLOCK)
            part.save_state({0, 1, 2})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner_brings_block_2)
            assert bytes(await handles.read(fh, 2 * BLOCK, 4096)) == data[2 * BLOCK:2 * BLOCK + 4096]
        handles.release(fh)
    owner.partials.unlock(obj, lock)
    part.close()
