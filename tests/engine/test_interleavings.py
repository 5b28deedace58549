"""The engine in the interleavings a mount cannot be driven into on cue:
priority, resume after a crash, a follower taking over, an object replaced
between two ranged GETs, cancellation with a request in flight."""

from __future__ import annotations

import errno
import json
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio

from lazyfs import coop
from lazyfs.download import Download
from lazyfs.errors import ObjectChanged, RemoteUnavailable, errno_of
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.namespace import RemoteObject
from lazyfs.store import LocalCopy
from support.enginekit import BUCKET, drop_locks, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote, Gate
from support.storefiles import rm_rf

KiB, MiB = 1024, 1024 * 1024
BLOCK = 256 * KiB  # fetch_config's part size, and so its block size


def record(store_dir: Path, obj: RemoteObject, fetcher: Fetcher) -> set[int]:
    """Blocks the resume record of `obj` names (empty if there is none)."""
    path = store_dir / ".lazyfs" / "tmp" / (fetcher.store.partials.name(obj) + ".json")
    try:
        return {b for first, end in json.loads(path.read_text())["runs"] for b in range(first, end)}
    except FileNotFoundError:
        return set()


@trio_test
async def test_a_demand_read_jumps_ahead_of_the_sweep(remote: FakeRemote, stores, tmp_path: Path) -> None:
    data = os.urandom(8 * MiB)
    obj = remote.put(BUCKET, "m/w.bin", data)
    held = remote.gate("m/w.bin", 0, BLOCK)  # the sweep's first request waits
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=1))
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        await wait_for(lambda: held.waiting, "the sweep's first GET")
        got: list[bytes] = []

        async def reader() -> None:
            got.append(bytes(await handles.read(fh, 6 * MiB, 4096)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.05)  # the reader is queued behind the sweep now
            held.release()
        assert got == [data[6 * MiB:6 * MiB + 4096]]
        gets = remote.gets("m/w.bin")
        assert gets[0].start == 0 and gets[1].start == 6 * MiB, [(g.start, g.end) for g in gets[:3]]
        handles.release(fh)


@trio_test
async def test_a_download_resumes_after_a_crash_from_the_recorded_blocks(remote: FakeRemote, stores,
                                                                        tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lazyfs")
    data = os.urandom(4 * MiB)
    obj = remote.put(BUCKET, "m/w.bin", data)
    stall = remote.gate("m/w.bin", 1 * MiB)  # everything after the first MiB hangs...
    first = Fetcher(remote, stores(), fetch_config(max_connections=2))
    async with running(first, close=False):  # ...until the process dies
        handles = Handles(first)
        fh = await handles.open(obj)
        assert bytes(await handles.read(fh, 0, MiB)) == data[:MiB]
        await wait_for(lambda: record(tmp_path / "store", obj, first) == {0, 1, 2, 3}, "the resume record")
        drop_locks(first)
    stall.fail()  # the dead process's connections are gone
    before = len(remote.gets())

    second = Fetcher(remote, stores(), fetch_config(max_connections=2))
    async with running(second):
        got = await second.acquire(obj)
        assert isinstance(got, Download), got
        assert got.partial.done == {0, 1, 2, 3}, got.partial.done
        await got.finished.wait()
        assert got.complete and got.error is None
    again = remote.gets()[before:]
    assert again and min(g.start for g in again) >= MiB, "bytes already on disk were fetched again"
    assert (tmp_path / "store" / "m/w.bin").read_bytes() == data
    # Its line does not say every byte came from S3 (an operator counting downloads after a crash).
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fetched")]
    assert f"{got.bytes_fetched} of them from S3, the rest resumed" in line and got.bytes_fetched < len(data), line


@trio_test
async def test_a_follower_serves_the_owners_bytes_then_takes_over_when_it_dies(remote: FakeRemote, stores,
                                                                              tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    obj = remote.put(BUCKET, "m/w.bin", data)
    stall = remote.gate("m/w.bin", 2 * BLOCK)
    owner = Fetcher(remote, stores(), fetch_config(max_connections=1))
    follower = Fetcher(remote, stores(), fetch_config(max_connections=1))
    async with running(follower):
        handles = Handles(follower)
        async with running(owner, close=False):
            dl = await owner.acquire(obj)
            assert isinstance(dl, Download)
            await wait_for(lambda: record(tmp_path / "store", obj, owner) == {0, 1}, "the owner's record")
            fh = await handles.open(obj)  # another process downloads it: follow
            assert bytes(await handles.read(fh, 0, 2 * BLOCK)) == data[:2 * BLOCK]
            assert len(remote.gets()) == 3, "the follower fetched what the owner had"
            drop_locks(owner)  # the owner dies: the kernel drops its lock...
        stall.fail()  # ...and its connections
        before = len(remote.gets())
        assert bytes(await handles.read(fh, 0, len(data))) == data
        handles.release(fh)
        taken = remote.gets()[before:]
        assert taken and min(g.start for g in taken) >= 2 * BLOCK, "the takeover fetched blocks on disk again"
        await wait_for((tmp_path / "store" / "m/w.bin").exists, "the taken-over download to be published")
    assert (tmp_path / "store" / "m/w.bin").read_bytes() == data


@asynccontextmanager
async def owner_held_and_follower(remote: FakeRemote, stores, obj: RemoteObject
                                  ) -> AsyncIterator[tuple[Fetcher, Download, Gate, Handles, int]]:
    """Two processes' engines over one store, each with one connection: the
    owner downloading `obj` with its second request held at a gate, and a
    follower with the file open."""
    held = remote.gate(obj.key, BLOCK, 2 * BLOCK)
    owner = Fetcher(remote, stores(), fetch_config(max_connections=1))
    follower = Fetcher(remote, stores(), fetch_config(max_connections=1))
    async with running(owner), running(follower):
        dl = await owner.acquire(obj)
        assert isinstance(dl, Download)
        await wait_for(lambda: held.waiting, "the owner's sweep to reach the gate")
        handles = Handles(follower)
        fh = await handles.open(obj)  # another process downloads it: follow
        yield owner, dl, held, handles, fh


@trio_test
async def test_a_followers_read_jumps_ahead_of_the_owners_sweep(remote: FakeRemote, stores, tmp_path: Path) -> None:
    """A reader in another process (a follower) waiting for bytes far ahead
    of the owner's sweep asks for them (a want file beside the download), and
    the owner fetches them next, as it would for a reader of its own; before,
    the follower waited for the sweep to get there, past its read deadline in
    a large file."""
    data = os.urandom(16 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    got: list[bytes] = []
    async with owner_held_and_follower(remote, stores, obj) as (_, dl, held, handles, fh):

        async def far_read() -> None:
            got.append(bytes(await handles.read(fh, 12 * BLOCK + 100, 4096)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(far_read)
            await wait_for(lambda: 12 in dl.demand, "the owner to hear the follower's want")
            held.release()
        assert got == [data[12 * BLOCK + 100:12 * BLOCK + 4196]]
        starts = [g.start // BLOCK for g in remote.gets()]
        assert starts[:3] == [0, 1, 12], f"the owner swept on before the wanted block: {starts[:6]}"
        assert not remote.gets()[3:] or all(g.start // BLOCK != 12 for g in remote.gets()[3:])
        handles.release(fh)
        await dl.finished.wait()
        await wait_for(lambda: not list((tmp_path / "store" / ".lazyfs" / "tmp").glob("*.want")),
                       "the want file to go with the download's other files")
    assert (tmp_path / "store" / "m/w.bin").read_bytes() == data


@trio_test
async def test_a_waiting_follower_asks_again_for_an_owner_that_took_over(remote: FakeRemote, stores, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """A follower still waiting after WANT_AGAIN_S asks again: a process that
    took a dead owner's download over reads a want file of its own, and would
    never hear a line written only once, to the file of the owner before."""
    monkeypatch.setattr(coop, "WANT_AGAIN_S", 0.3)
    data = os.urandom(16 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    asked = b"%d %d\n" % (12 * BLOCK + 100, 12 * BLOCK + 4196)
    got: list[bytes] = []
    async with owner_held_and_follower(remote, stores, obj) as (owner, dl, held, handles, fh):
        want_file = tmp_path / "store" / ".lazyfs" / "tmp" / (owner.store.partials.name(obj) + ".want")

        async def far_read() -> None:
            got.append(bytes(await handles.read(fh, 12 * BLOCK + 100, 4096)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(far_read)
            await wait_for(lambda: want_file.exists() and want_file.read_bytes().startswith(asked), "the first want")
            want_file.unlink()  # as if a new owner had started afresh
            await wait_for(lambda: want_file.exists() and want_file.read_bytes().startswith(asked),
                           "the follower to ask again", timeout=5)
            held.release()
        assert got == [data[12 * BLOCK + 100:12 * BLOCK + 4196]]
        handles.release(fh)
        await dl.finished.wait()
    assert (tmp_path / "store" / "m/w.bin").read_bytes() == data


@trio_test
async def test_an_object_replaced_between_two_ranged_gets_is_never_stitched(remote: FakeRemote, stores,
                                                                           tmp_path: Path) -> None:
    old = os.urandom(2 * MiB)
    obj = remote.put(BUCKET, "m/w.bin", old)
    changed: list[RemoteObject] = []

    def replace_before_the_second_get(call: object) -> None:
        if len(remote.gets()) == 2:
            remote.put(BUCKET, "m/w.bin", os.urandom(2 * MiB))

    remote.on_get.append(replace_before_the_second_get)
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=1))

    async def on_changed(o: RemoteObject) -> None:
        changed.append(o)

    fetcher.hooks.on_changed = on_changed
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        assert bytes(await handles.read(fh, 0, BLOCK)) == old[:BLOCK]
        try:
            await handles.read(fh, MiB, 4096)
        except ObjectChanged as e:
            assert errno_of(e) == errno.ESTALE
        else:
            raise AssertionError("read bytes of a replaced object")
        handles.release(fh)
        assert changed == [obj]
        await wait_for(lambda: not list((tmp_path / "store" / ".lazyfs" / "tmp").glob("*.part")),
                       "the stale partial to be removed")
    assert not (tmp_path / "store" / "m/w.bin").exists()


@trio_test
async def test_cancelling_mid_transfer_fails_readers_and_keeps_the_descriptor_for_the_thread(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    obj = remote.put(BUCKET, "m/w.bin", data)
    stall = remote.gate("m/w.bin", 0, in_body=True)  # 64 KiB arrive, then the body hangs
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=1))
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        assert bytes(await handles.read(fh, 0, 4096)) == data[:4096]
        dl = fetcher.active(obj)
        assert dl is not None
        failures: list[BaseException] = []

        async def reader() -> None:
            try:
                await handles.read(fh, 200 * KiB, 4096)
            except RemoteUnavailable as e:
                failures.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await wait_for(lambda: dl.waiters, "the reader to wait")
            await fetcher.close(grace=0.2)
        assert failures and "shutting down" in str(failures[0])
        handles.release(fh)
        # The worker is still parked in the body: its pin keeps the file open.
        assert dl.pins >= 1 and os.fstat(dl.fd)
        stall.release()  # it wakes up, writes its piece, sees the cancel and ends
        await wait_for(lambda: dl.pins == 0, "the worker to let go")
        try:
            os.fstat(dl.fd)
        except OSError as e:
            assert e.errno == errno.EBADF
        else:
            raise AssertionError("the descriptor outlived its last user")
    assert list((tmp_path / "store" / ".lazyfs" / "tmp").glob("*.part")), "an interrupted download was not kept"


@trio_test
async def test_a_published_file_is_a_local_copy_and_costs_no_request(remote: FakeRemote, stores,
                                                                     tmp_path: Path) -> None:
    data = os.urandom(300 * KiB)
    obj = remote.put(BUCKET, "m/w.bin", data, checksum="CRC32")
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetcher.acquire(obj)
        assert isinstance(dl, Download)
        await dl.finished.wait()
        assert dl.complete
        requests = len(remote.calls)
        again = await fetcher.acquire(obj)
        assert isinstance(again, LocalCopy) and again.state == "cached"
        os.close(again.fd)
        assert len(remote.calls) == requests


@trio_test
async def test_readers_of_a_replaced_object_fail_only_once_the_mount_has_learned_the_new_version(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    """Several requests meet the replaced object: the first tells the mount
    (on_changed, so that the next open finds the new version), and no reader
    may get ESTALE before that is done, whichever request fails it."""
    old = os.urandom(4 * MiB)
    obj = remote.put(BUCKET, "m/w.bin", old)
    remote.put(BUCKET, "m/w.bin", os.urandom(4 * MiB))  # replaced before the first GET: every GET fails
    told = trio.Event()
    order: list[str] = []
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=4))

    async def on_changed(o: RemoteObject) -> None:
        await told.wait()  # a slow recheck (a HEAD, a listing)
        order.append("told")

    fetcher.hooks.on_changed = on_changed
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)

        async def reader(offset: int) -> None:
            try:
                await handles.read(fh, offset, 4096)
            except ObjectChanged:
                order.append("ESTALE")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, 0)
            nursery.start_soon(reader, 3 * MiB)
            await wait_for(lambda: len(remote.gets()) >= 2, "two requests to meet the new object")
            await trio.sleep(0.3)  # what fails meanwhile fails
            told.set()
        handles.release(fh)
    assert order == ["told", "ESTALE", "ESTALE"]


FILE_GONE = "its download file was removed from the store before it was complete"


@pytest.mark.parametrize("removed, made_again, why", [
    (".lazyfs/tmp", False, FILE_GONE), (".", True, FILE_GONE),
    (".", False, "the store's folder was removed under the mount"),
], ids=["download-file", "store-made-again", "store-gone"])
@trio_test
async def test_a_download_whose_file_was_removed_meanwhile_says_in_its_line_it_was_not_kept(
        remote: FakeRemote, stores, tmp_path: Path, caplog: pytest.LogCaptureFixture, removed: str,
        made_again: bool, why: str) -> None:
    """Its file removed as it ran (the store cleaned by hand): the readers
    that have it open are served and nothing is kept, but its last line,
    "fetched ... verified by MD5", read as if the copy were in the store."""
    caplog.set_level(logging.INFO, logger="lazyfs")
    data = os.urandom(2 * MiB)
    obj = remote.put(BUCKET, "m/w.bin", data)
    gate = remote.gate("m/w.bin", MiB)
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=2))
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        assert bytes(await handles.read(fh, 0, MiB)) == data[:MiB]
        store = tmp_path / "store"
        await trio.to_thread.run_sync(rm_rf, store / removed)  # as rm -rf: a record renamed meanwhile is no error
        if made_again:
            store.mkdir()
        gate.release()
        assert bytes(await handles.read(fh, MiB, MiB)) == data[MiB:]
        handles.release(fh)
        await wait_for(lambda: any(r.getMessage().startswith("fetched") for r in caplog.records), "its line")
    assert not (tmp_path / "store" / "m/w.bin").exists()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fetched")]
    assert line.endswith(f"verified by MD5; not kept ({why}): served to its readers only"), line
