"""Engine tests (no kernel): the blocks that complete a file wait for its
verification, and an open file that was served bytes which then failed it
reads on no more (lazyfs/lastbytes.py)."""

from __future__ import annotations

import os

import pytest
import trio

from lazyfs.download import Download
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.lastbytes import ServedBadBytes
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote

KiB = 1024
BLOCK = 256 * KiB
KEY = "m/w.bin"


def corrupted_once(remote: FakeRemote, size: int):  # type: ignore[no-untyped-def]
    """An object whose GETs return one flipped byte (`corrupt` again flips it
    back), and a gate its first request (the one from byte 0) parks at."""
    data = os.urandom(size)
    obj = remote.put(BUCKET, KEY, data)
    remote.corrupt(BUCKET, KEY, at=10)
    first = remote.gate(KEY, 0, 1)  # let through once a gate for the request made again is up
    return data, obj, first


@trio_test
async def test_a_reader_waiting_for_the_last_bytes_gets_the_right_ones_after_a_failed_check(
        remote: FakeRemote, stores) -> None:
    """One request brings the whole file: its bytes are held until verified,
    so a reader never sees the corrupted ones, and gets the download made again."""
    data, obj, first = corrupted_once(remote, 1000)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        got: list[bytes] = []

        async def read() -> None:
            got.append(bytes(await handles.read(fh, 0, 4096)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await wait_for(lambda: first.waiting, "the first GET")
            again = remote.gate(KEY, 0, 1)
            first.release()
            await wait_for(lambda: again.waiting, "the GET after the failed check")
            assert not got, "a reader was served bytes before they were verified"
            remote.corrupt(BUCKET, KEY, at=10)  # flipped back: the store serves the right bytes again
            again.release()
        assert got == [data]
        handles.release(fh)


@trio_test
async def test_a_handle_served_bytes_that_failed_the_check_gets_eio_at_once_a_new_one_reads_on(
        remote: FakeRemote, stores) -> None:
    data, obj, first = corrupted_once(remote, 4 * BLOCK + 100)
    fetcher = Fetcher(remote, stores(), fetch_config(read_deadline=30.0))
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        async with trio.open_nursery() as nursery:
            served = trio.Event()
            refused: list[BaseException] = []

            async def reader() -> None:
                head = bytes(await handles.read(fh, 0, 4096))
                assert head != data[:4096], "the corrupted bytes, served as they arrived"
                served.set()
                try:  # on through the file: the blocks that complete it wait for the check
                    for off in range(4096, len(data), 64 * KiB):
                        await handles.read(fh, off, 64 * KiB)
                except ServedBadBytes as e:
                    refused.append(e)
                else:
                    raise AssertionError("a read of the whole file ended on bytes that failed the check")

            nursery.start_soon(reader)
            await wait_for(lambda: first.waiting, "the first GET")
            again = remote.gate(KEY, 0, 1)
            first.release()
            with trio.fail_after(10):
                await served.wait()
                # Refused as the download starts over, not once the new one has the bytes.
                await wait_for(lambda: refused, "the reader refused")
            # (the gate still holds the download made again: the refusal did not wait for it)
            await wait_for(lambda: again.waiting, "the GET after the failed check")
            with pytest.raises(ServedBadBytes):  # and every later read of that handle
                await handles.read(fh, 0, 4096)
            fh2 = await handles.open(obj)
            remote.corrupt(BUCKET, KEY, at=10)
            again.release()
            assert bytes(await handles.read(fh2, 0, len(data))) == data
        dl = handles._open[fh2].download
        assert isinstance(dl, Download) and dl.generation == 2
        handles.release(fh)
        handles.release(fh2)
