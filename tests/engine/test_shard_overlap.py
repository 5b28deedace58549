"""A loader walking a sharded checkpoint with whole-file opens: the next
shard's download starts as soon as the opened shard has nothing left to
request, not once the opened shard is verified and published (issue 13:
the shards of a cold load came one after the other, the connections idle
through each one's last requests and its verification)."""

from __future__ import annotations

import os

import trio

from lazyfs.download import PENDING
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.namespace import RemoteObject
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote

KiB, MiB = 1024, 1024 * 1024
BLOCK = 256 * KiB


@trio_test
async def test_a_whole_file_open_starts_the_next_shard_once_its_own_requests_are_out(
        remote: FakeRemote, stores) -> None:
    """The opened shard's last request is held on the wire: the next shard
    starts meanwhile, while the open still waits; not before every block of
    the opened shard was requested (it would take connections a waiting
    reader needs)."""
    data = os.urandom(8 * BLOCK)
    first = remote.put(BUCKET, "m/model-00001-of-00002.safetensors", data)
    second = remote.put(BUCKET, "m/model-00002-of-00002.safetensors", os.urandom(MiB))
    held = remote.gate(first.key, start=7 * BLOCK)  # the last block's request stays on the wire
    fetcher = Fetcher(remote, stores(), fetch_config(part_size=BLOCK, max_connections=4, whole_file_open="always"))
    # Whether the opened shard had blocks not yet requested (claimed) when the next one started.
    # (The order GETs reach the remote says less: a claimed request's thread may start after the next shard's.)
    pending_at_start: list[bool] = []
    warm = fetcher.warm

    def warm_noting(obj: RemoteObject) -> None:
        if obj == second:
            dl = fetcher.active(first)
            pending_at_start.append(dl is None or PENDING in dl.state)
        warm(obj)

    fetcher.warm = warm_noting
    async with running(fetcher):
        handles = Handles(fetcher)
        handles.passes_through = lambda: True
        handles.next_shard = lambda obj: second if obj == first else None
        async with trio.open_nursery() as nursery:
            opened: list[int] = []

            async def open_first() -> None:
                opened.append(await handles.open(first))

            nursery.start_soon(open_first)
            await wait_for(lambda: held.waiting, "the shard's last request")
            await wait_for(lambda: remote.gets(second.key), "the next shard to start while the open waits")
            assert not opened, "the open returned before its shard was whole"
            assert pending_at_start == [False], "the next shard started before the opened one's last request"
            assert {c.start // BLOCK for c in remote.gets(first.key)} == set(range(8))
            held.release()
        assert opened
        handles.release(opened[0])
