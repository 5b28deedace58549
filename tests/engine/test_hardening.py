"""Issue 11 at the engine tier: each defect in the exact interleaving that
shows it (a follower trusting another file's record, a restart with no room
for a second copy, opens queued behind bulk work, a shutdown waiting for a
long verification, and an unexpected exception in every background task)."""

from __future__ import annotations

import errno
import os
import resource
import threading
from pathlib import Path

import pytest
import trio

from lazyfs import alongside, completion, dispatch, piecesums, readback, verify
from lazyfs import handles as handles_module
from lazyfs.coop import ForeignDownload
from lazyfs.download import Download
from lazyfs.errors import IntegrityError, LazyfsError, RemoteUnavailable, StoreError
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.lastbytes import ServedBadBytes
from lazyfs.namespace import RemoteObject
from lazyfs.stats import STATS
from lazyfs.store import LocalCopy
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote, Gate

KiB, MiB = 1024, 1024 * 1024
BLOCK = 256 * KiB


def another_process_downloading(stores, obj: RemoteObject, data: bytes, blocks: set[int]):  # type: ignore[no-untyped-def]
    """The owner of `obj`'s download in another process, driven by hand
    through its store: (its store, its lock, its partial file with `blocks`)."""
    owner = stores()
    lock = owner.partials.lock(obj)
    assert lock is not None
    part = owner.partials.open(obj, BLOCK)
    for i in blocks:
        os.pwrite(part.fd, data[i * BLOCK:(i + 1) * BLOCK], i * BLOCK)
    part.save_state(blocks)
    return owner, lock, part


@trio_test
async def test_a_follower_never_trusts_a_record_of_another_file(remote: FakeRemote, stores,
                                                                tmp_path: Path) -> None:
    """The owner discards its partial file and starts a new one: the follower
    must remap, never answer from the old file's holes, and drop the pages the
    kernel cached from the old file."""
    data = os.urandom(4 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    owner, lock, first = another_process_downloading(stores, obj, data, {0, 1})

    dropped: list[RemoteObject] = []

    def drop_pages(o: RemoteObject) -> None:
        dropped.append(o)

    follower = Fetcher(remote, stores(), fetch_config())
    follower.hooks.on_bad_data = drop_pages
    async with running(follower):
        handles = Handles(follower)
        fh = await handles.open(obj)
        assert isinstance(handles._open[fh].download, ForeignDownload)
        assert bytes(await handles.read(fh, 0, BLOCK)) == data[:BLOCK]
        # The owner's bytes failed verification: it starts over in a new file...
        owner.partials.discard(first)
        second = owner.partials.open(obj, BLOCK)
        assert second.ino != first.ino
        os.pwrite(second.fd, data[2 * BLOCK:3 * BLOCK], 2 * BLOCK)
        second.save_state({2})  # ...whose record names block 2, a hole of the old file
        # The handle that was served the old file's bytes reads on no more
        # (they failed verification: lastbytes.py); a new open reads the new file.
        with pytest.raises(ServedBadBytes):
            await handles.read(fh, 2 * BLOCK, 4096)
        fh2 = await handles.open(obj)
        assert bytes(await handles.read(fh2, 2 * BLOCK, 4096)) == data[2 * BLOCK:2 * BLOCK + 4096]
        assert dropped == [obj]
        os.pwrite(second.fd, data, 0)
        owner.publish(second)
        owner.partials.unlock(obj, lock)
        assert bytes(await handles.read(fh2, 0, len(data))) == data
        with pytest.raises(ServedBadBytes):
            await handles.read(fh, 0, 4096)
        handles.release(fh)
        handles.release(fh2)
    first.close()
    second.close()
    assert remote.count("GET") == 0, "the follower downloaded what the owner had"


@trio_test
async def test_a_follower_serves_the_read_its_page_drop_waits_for(remote: FakeRemote, stores) -> None:
    """The kernel finishes dropping a file's pages only once the reads in
    flight on it are answered.  A follower whose owner started over must go on
    following (and answer those reads) while the drop waits: awaiting the drop
    first left the read waiting for the follower and the follower for the read
    until the read deadline (found by the chaos test with the CRT client).
    Starting the drop now returns at once (kernelcache.py runs it)."""
    data = os.urandom(4 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    owner, lock, first = another_process_downloading(stores, obj, data, {0})
    drops: list[RemoteObject] = []
    follower = Fetcher(remote, stores(), fetch_config(read_deadline=30.0))
    follower.hooks.on_bad_data = drops.append
    async with running(follower):
        handles = Handles(follower)
        fh = await handles.open(obj)
        assert bytes(await handles.read(fh, 0, 4096)) == data[:4096]
        fh2 = await handles.open(obj)  # served nothing yet: it may read the new file

        async def read_block_3() -> None:
            got = bytes(await handles.read(fh2, 3 * BLOCK, 4096))
            assert got == data[3 * BLOCK:3 * BLOCK + 4096]

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_block_3)  # a hole of the first file: in flight
                await trio.sleep(0.3)
                owner.partials.discard(first)  # the owner starts over...
                second = owner.partials.open(obj, BLOCK)
                os.pwrite(second.fd, data[3 * BLOCK:], 3 * BLOCK)
                second.save_state({3})  # ...and its new file has the block
        assert drops == [obj]
        with pytest.raises(ServedBadBytes):  # it was served the old file's bytes
            await handles.read(fh, 3 * BLOCK, 4096)
        handles.release(fh)
        handles.release(fh2)
    owner.partials.unlock(obj, lock)
    first.close()
    second.close()


@trio_test
async def test_stopping_fails_a_followers_waiting_reads_at_once(remote: FakeRemote, stores) -> None:
    """SIGTERM: the main loop ends once every request is answered, so a read
    waiting on another process's download gets EIO now, not at its deadline."""
    data = os.urandom(2 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    owner, lock, part = another_process_downloading(stores, obj, data, set())
    follower = Fetcher(remote, stores(), fetch_config(read_deadline=60.0))
    async with running(follower):
        handles = Handles(follower)
        fh = await handles.open(obj)
        failed: list[int] = []

        async def read() -> None:
            try:
                await handles.read(fh, BLOCK, 4096)
            except LazyfsError as e:
                failed.append(e.errno)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.sleep(0.3)
                await follower.close()
        assert failed == [errno.EIO]
        handles.release(fh)
    owner.partials.unlock(obj, lock)
    part.close()


@trio_test
async def test_a_restart_after_bad_bytes_needs_room_for_one_copy_and_enospc_fails_only_the_download(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11.5: the re-download after an integrity failure could not get its
    file (ENOSPC): the readers get ENOSPC, the engine (the mount) goes on."""
    data = os.urandom(MiB)
    obj = remote.put(BUCKET, "m/w.bin", data)
    remote.corrupt(BUCKET, "m/w.bin", at=1000)  # bad bytes in transit: a restart follows
    other = remote.put(BUCKET, "m/other.bin", b"x" * 1000)
    store = stores()
    real_open = store.partials.open
    opened = []

    def open_without_room(o: RemoteObject, block_size: int):  # type: ignore[no-untyped-def]
        opened.append(o.key)
        if o.key == "m/w.bin" and opened.count("m/w.bin") == 2:  # the restart's file
            raise StoreError(f"{o.uri}: needs 1.0 MiB but the store has 0.5 MiB free", errno.ENOSPC)
        return real_open(o, block_size)

    monkeypatch.setattr(store.partials, "open", open_without_room)
    fetcher = Fetcher(remote, store, fetch_config())
    async with running(fetcher):
        dl = await fetcher.acquire(obj)
        assert isinstance(dl, Download)
        await dl.finished.wait()
        assert isinstance(dl.error, StoreError) and dl.error.errno == errno.ENOSPC
        # The engine still serves.
        got = await fetcher.acquire(other)
        assert isinstance(got, Download)
        await got.finished.wait()
        assert got.complete


@trio_test
async def test_opens_never_wait_behind_verifications(remote: FakeRemote, stores,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11.11: eight large files being hashed must not hold up an open."""
    release = threading.Event()
    hashing = []
    real_feed = readback.read_into

    def slow_hash(*args, **kw):  # type: ignore[no-untyped-def]
        hashing.append(1)
        release.wait(20)
        real_feed(*args, **kw)

    monkeypatch.setattr(readback, "read_into", slow_hash)
    objs = [remote.put(BUCKET, f"m/big{i}.bin", os.urandom(64 * KiB)) for i in range(10)]
    small = remote.put(BUCKET, "m/config.json", b"{}")
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=8))
    try:
        async with running(fetcher):
            downloads = [await fetcher.acquire(o, background=True) for o in objs]
            await wait_for(lambda: all(isinstance(d, Download) and d.all_done for d in downloads),
                           "every download to reach its verification")
            await wait_for(lambda: len(hashing) >= 2, "verifications to run")
            await trio.sleep(0.3)  # every thread the store work may have is taken by now
            with trio.fail_after(5):  # queued behind the hashing, this would wait for all of it
                got = await fetcher.acquire(small)
                if isinstance(got, LocalCopy):
                    os.close(got.fd)
                state = (await fetcher.state_of(objs[-1])).state  # getxattr's path
            assert state in ("downloading", "cached")
            release.set()
    finally:
        release.set()


@trio_test
async def test_shutdown_does_not_wait_for_a_long_verification(remote: FakeRemote, stores, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11.12: a verification that would take minutes stops at close."""
    started = threading.Event()

    def endless_hash(fd, start, end, h, cancelled) -> None:  # type: ignore[no-untyped-def]
        started.set()
        while not cancelled():  # a 100 GiB file, one 4 MiB read at a time
            threading.Event().wait(0.01)
        raise InterruptedError("verification cancelled")

    monkeypatch.setattr(readback, "read_into", endless_hash)
    obj = remote.put(BUCKET, "m/w.bin", os.urandom(MiB))
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher, close=False):
        dl = await fetcher.acquire(obj)
        assert isinstance(dl, Download)
        await wait_for(started.is_set, "the verification")
        with trio.fail_after(3):
            await fetcher.close(grace=2)
        assert dl.pins == 0 and dl.error is not None
    assert not (tmp_path / "store" / "m/w.bin").exists()


@trio_test
async def test_the_dispatcher_survives_an_unexpected_exception(remote: FakeRemote, stores,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real_pick = dispatch.pick
    calls = iter([True])

    def pick_fails_once(downloads, demanded_only=False):  # type: ignore[no-untyped-def]
        if next(calls, False):
            raise RuntimeError("a bug in the scheduler")
        return real_pick(downloads, demanded_only)

    monkeypatch.setattr(dispatch, "pick", pick_fails_once)
    data = os.urandom(300 * KiB)
    obj = remote.put(BUCKET, "m/w.bin", data)
    before = STATS.background_errors["dispatcher"]
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        assert bytes(await handles.read(fh, 0, len(data))) == data
        handles.release(fh)
    assert STATS.background_errors["dispatcher"] == before + 1


@trio_test
async def test_an_engine_task_that_raises_does_not_end_the_engine(remote: FakeRemote, stores,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume-record save, a publish, a discard: whatever the store throws."""
    def broken_record(self, done) -> None:  # type: ignore[no-untyped-def]
        raise ValueError("a record nobody can write")

    monkeypatch.setattr("lazyfs.partials.Partial.save_state", broken_record)
    data = os.urandom(MiB)
    obj = remote.put(BUCKET, "m/w.bin", data)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        assert bytes(await handles.read(fh, 0, len(data))) == data
        handles.release(fh)
        dl = await fetcher.acquire(obj)
        if isinstance(dl, Download):
            await dl.finished.wait()


@trio_test
async def test_the_coop_poll_failing_gives_the_readers_an_error_and_the_engine_goes_on(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    obj = remote.put(BUCKET, "m/w.bin", os.urandom(MiB))
    other = remote.put(BUCKET, "m/o.bin", b"o" * 1000)
    owner = stores()
    lock = owner.partials.lock(obj)
    fetcher = Fetcher(remote, stores(), fetch_config())
    monkeypatch.setattr(fetcher.store.partials, "foreign_progress",
                        lambda o: (_ for _ in ()).throw(ValueError("a record from the future")))
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        with pytest.raises(ValueError):
            await handles.read(fh, 0, 4096)
        handles.release(fh)
        got = await fetcher.acquire(other)
        assert isinstance(got, Download)
        await got.finished.wait()
        assert got.complete
    assert lock is not None
    owner.partials.unlock(obj, lock)


def test_completion_module_is_the_one_that_hashes() -> None:
    # The tests above replace verify.check; make sure the engine calls it there.
    assert completion.verify is verify


async def fetch_whole(fetcher: Fetcher, obj: RemoteObject) -> Download:
    dl = await fetcher.acquire(obj)
    assert isinstance(dl, Download)
    await dl.finished.wait()
    return dl


async def fetch_new(remote: FakeRemote, stores, key: str, size: int, background: bool = False) -> Download:
    """A new object of `size` random bytes, fetched whole by an engine of its own."""
    obj = remote.put(BUCKET, key, os.urandom(size))
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=2))
    async with running(fetcher):
        dl = await fetcher.acquire(obj, background=background)
        assert isinstance(dl, Download)
        await dl.finished.wait()
        return dl


@trio_test
async def test_multipart_uploads_with_parts_of_different_sizes_verify(remote: FakeRemote, stores,
                                                                      tmp_path: Path) -> None:
    """Issue 11.4: part 1's size does not fit the others: each part's size is
    asked for, and the ETag recomputed from them matches."""
    data = os.urandom(3 * MiB + 1000)
    obj = remote.put(BUCKET, "m/v.bin", data, parts=(MiB, 2 * MiB, 1000))
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, obj)
        assert dl.complete and dl.verified == "MD5-multipart", dl.error
    assert len(remote.gets()) == len({(g.start, g.end) for g in remote.gets()}), "downloaded twice"
    assert (tmp_path / "store" / "m/v.bin").read_bytes() == data


@trio_test
async def test_a_composite_checksum_verifies_a_multipart_upload_and_catches_bad_bytes(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    """boto3's multipart uploads carry a composite CRC32: it is preferred to
    the multipart ETag (a CRC instead of MD5s), recomputed over the parts'
    reported sizes (part 1's size fits, wrongly, the others: checked again
    with each part's), and bytes that do not match it are never published."""
    data = os.urandom(4 * MiB + 500)
    obj = remote.put(BUCKET, "m/v.bin", data, checksum="CRC32-composite", parts=(2 * MiB, MiB, MiB + 500))
    bad = remote.put(BUCKET, "m/bad.bin", data[::-1], checksum="CRC32-composite", parts=(2 * MiB, MiB, MiB + 500))
    remote.corrupt(BUCKET, "m/bad.bin", at=2 * MiB + 5)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, obj)
        assert dl.complete and dl.verified == "CRC32-composite", dl.error
        dl = await fetch_whole(fetcher, bad)
        assert isinstance(dl.error, IntegrityError) and "CRC32-composite" in str(dl.error), dl.error
    assert (tmp_path / "store" / "m/v.bin").read_bytes() == data
    assert not (tmp_path / "store" / "m/bad.bin").exists()


@trio_test
async def test_a_big_file_asks_for_the_checksum_its_listing_does_not_name(remote: FakeRemote, stores) -> None:
    """SeaweedFS answers a HEAD with the CRC an uploader sent but lists none:
    a file from completion.ASK_FOR_A_CHECKSUM_FROM on is asked for it (one
    HEAD, and a CRC instead of an MD5); a smaller one is not (the request
    would cost more than the MD5)."""
    big = remote.put(BUCKET, "m/big.bin", os.urandom(completion.ASK_FOR_A_CHECKSUM_FROM), checksum="CRC32",
                     lists_checksum=False)
    small = remote.put(BUCKET, "m/small.bin", os.urandom(MiB), checksum="CRC32", lists_checksum=False)
    assert not big.checksum_algorithm and not small.checksum_algorithm
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, small)
        assert dl.complete and dl.verified == "MD5", dl.error
        assert remote.count("HEAD") == 0
        dl = await fetch_whole(fetcher, big)
        assert dl.complete and dl.verified == "CRC32", dl.error
        assert remote.count("HEAD") == 1


@trio_test
async def test_a_failed_head_for_a_checksum_the_listing_does_not_name_leaves_the_etag_check(
        remote: FakeRemote, stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """That HEAD is asked only in case the store keeps a checksum: when it
    fails, the file is verified by the ETag its GETs carried, not failed."""
    data = os.urandom(completion.ASK_FOR_A_CHECKSUM_FROM)
    big = remote.put(BUCKET, "m/big.bin", data, checksum="CRC32", lists_checksum=False)

    def head_fails(*args: object, **kwargs: object) -> None:
        raise RemoteUnavailable("HEAD m/big.bin: connection reset")

    monkeypatch.setattr(remote, "head", head_fails)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, big)
        assert dl.complete and dl.verified == "MD5", dl.error
    assert (tmp_path / "store" / "m/big.bin").read_bytes() == data


@trio_test
async def test_a_wrong_checksum_from_the_store_is_overruled_by_a_matching_etag_only(
        remote: FakeRemote, stores, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A store that computes its checksums differently (a composite or a CRC
    that does not match the bytes uploaded) would have every download of the
    object refused: bytes that match its MD5 ETag are published, verified by
    the ETag, with a warning naming the checksum; bytes that match neither
    are still refused, as are bytes whose ETag cannot be recomputed (a store
    that cannot say where the parts are): the checksum is the only evidence."""
    data = os.urandom(4 * MiB + 500)
    parts = (2 * MiB, MiB, MiB + 500)
    composite = remote.put(BUCKET, "m/composite.bin", data, checksum="CRC32-composite", parts=parts)
    whole = remote.put(BUCKET, "m/whole.bin", data[:MiB], checksum="CRC32")
    bad = remote.put(BUCKET, "m/bad.bin", data[::-1], checksum="CRC32-composite", parts=parts)
    unsure = remote.put(BUCKET, "m/unsure.bin", os.urandom(len(data)), checksum="CRC32", parts=parts,
                        says_parts=False)
    partly = remote.put(BUCKET, "m/partly.bin", os.urandom(len(data)), checksum="CRC32", parts=parts)
    part = remote.part  # part 1's size is told (and fits the others wrongly), no other part's is
    remote.part = lambda obj, n: part(obj, n) if n == 1 or obj.key != partly.key else None  # type: ignore[method-assign]
    for key in ("m/composite.bin", "m/whole.bin", "m/bad.bin", "m/unsure.bin", "m/partly.bin"):
        remote.misreport_checksum(BUCKET, key)
    remote.corrupt(BUCKET, "m/bad.bin", at=3 * MiB)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, composite)
        assert dl.complete and dl.verified == "MD5-multipart", dl.error
        dl = await fetch_whole(fetcher, whole)
        assert dl.complete and dl.verified == "MD5", dl.error
        dl = await fetch_whole(fetcher, bad)
        assert isinstance(dl.error, IntegrityError) and "CRC32-composite" in str(dl.error), dl.error
        for obj in (unsure, partly):
            dl = await fetch_whole(fetcher, obj)
            assert isinstance(dl.error, IntegrityError) and "CRC32" in str(dl.error), (obj.key, dl.error)
    assert (tmp_path / "store" / "m/composite.bin").read_bytes() == data
    assert (tmp_path / "store" / "m/whole.bin").read_bytes() == data[:MiB]
    assert not (tmp_path / "store" / "m/bad.bin").exists()
    assert not (tmp_path / "store" / "m/unsure.bin").exists() and not (tmp_path / "store" / "m/partly.bin").exists()
    warned = [r.getMessage() for r in caplog.records if "its checksum is taken to be wrong" in r.getMessage()]
    assert len(warned) == 2 and "CRC32-composite" in warned[0] and "CRC32 " in warned[1], warned
    assert not [r for r in caplog.records if "published unverified" in r.getMessage()], "said of a refused file"


@trio_test
async def test_a_store_that_cannot_say_its_parts_gives_unverified_not_corrupt(remote: FakeRemote, stores,
                                                                             tmp_path: Path) -> None:
    """Issue 11.4 (and Ceph RGW, s3rver): no parts count, no verdict."""
    data = os.urandom(2 * MiB + 7)
    obj = remote.put(BUCKET, "m/c.bin", data, parts=(MiB, MiB, 7), says_parts=False)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, obj)
        assert dl.complete and dl.verified == "unverified", dl.error
    assert (tmp_path / "store" / "m/c.bin").read_bytes() == data
    gets_once = sum(g.end - g.start for g in remote.gets())
    assert gets_once == len(data), "downloaded again"


@trio_test
async def test_a_store_that_cannot_say_its_parts_verifies_a_common_uploaders_parts(remote: FakeRemote, stores,
                                                                                  tmp_path: Path) -> None:
    """Ceph RGW ignores partNumber: an upload in boto3's 8 MiB parts verifies
    by its multipart ETag all the same; one in parts of another size is
    published unverified (the guess was wrong, which says nothing about the
    bytes), never called corrupt."""
    common = remote.put(BUCKET, "m/boto3.bin", os.urandom(19 * MiB), parts=(8 * MiB, 8 * MiB, 3 * MiB),
                        says_parts=False)
    other = remote.put(BUCKET, "m/other.bin", os.urandom(13 * MiB), parts=(6 * MiB, 6 * MiB, MiB),
                       says_parts=False)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, common)
        assert dl.complete and dl.verified == "MD5-multipart", dl.error
        dl = await fetch_whole(fetcher, other)
        assert dl.complete and dl.verified == "unverified", dl.error
    assert (tmp_path / "store" / "m/other.bin").exists()


@trio_test
async def test_bytes_that_really_do_not_match_a_confirmed_multipart_etag_are_never_published(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    obj = remote.put(BUCKET, "m/bad.bin", data, parts=(MiB, MiB, MiB))
    remote.corrupt(BUCKET, "m/bad.bin", at=MiB + 5)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, obj)
        assert isinstance(dl.error, IntegrityError)
    assert not (tmp_path / "store" / "m/bad.bin").exists()
    assert sum(g.end - g.start for g in remote.gets()) == 2 * len(data), "tried other than twice"


@trio_test
async def test_prefetch_counts_a_raw_store_error_as_a_failed_file_and_goes_on(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11.6: EMFILE or ENOSPC from the store's lock, EACCES from a
    prebaked copy: the file fails, the warm-up (and `lazyfs bake`) goes on."""
    from lazyfs.prefetch import Prefetcher

    objs = [remote.put(BUCKET, f"m/{i}.bin", os.urandom(1000)) for i in range(4)]
    store = stores()
    real_lock = store.partials.lock

    def lock(o: RemoteObject) -> int | None:
        if o.key == "m/1.bin":
            raise OSError(errno.EMFILE, "Too many open files")
        return real_lock(o)

    monkeypatch.setattr(store.partials, "lock", lock)
    fetcher = Fetcher(remote, store, fetch_config())
    async with running(fetcher):
        progress = await Prefetcher(fetcher).run(objs)
    assert progress.done_files == 3 and [uri for uri, _ in progress.failed] == [objs[1].uri]
    assert "Too many open files" in progress.failed[0][1]


@trio_test
async def test_the_file_is_hashed_as_it_fills_so_verification_ends_with_the_last_byte(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13.3: the digest follows the contiguous prefix; at the end only
    the tail is hashed, and no byte is read for hashing twice."""
    hashed = []
    real_feed = readback.read_into

    def counting(fd, start, end, h, cancelled):  # type: ignore[no-untyped-def]
        hashed.append((start, end))
        real_feed(fd, start, end, h, cancelled)

    monkeypatch.setattr(readback, "read_into", counting)
    data = os.urandom(6 * MiB + 123)
    obj = remote.put(BUCKET, "m/w.bin", data)
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=2))
    async with running(fetcher):
        dl = await fetcher.acquire(obj)
        assert isinstance(dl, Download)
        await dl.finished.wait()
        assert dl.complete and dl.verified == "MD5"
    assert sum(end - start for start, end in hashed) == len(data), hashed
    assert len(hashed) > 1, "hashed in one go at the end"


@trio_test
async def test_a_crc_is_verified_from_the_sums_of_the_pieces_without_reading_the_file_back(
        remote: FakeRemote, stores) -> None:
    """piecesums.py: each piece's CRC is taken as it is written and the sums are
    combined (part by part for a composite), so no byte is read back to verify;
    bad bytes in transit still fail, decided by the bytes on disk."""
    data = os.urandom(6 * MiB + 123)
    whole = remote.put(BUCKET, "m/c.bin", data, checksum="CRC32")
    parts = remote.put(BUCKET, "m/p.bin", data, checksum="CRC32-composite", parts=(3 * MiB, 3 * MiB, 123))
    bad = remote.put(BUCKET, "m/bad.bin", data[::-1], checksum="CRC32")
    remote.corrupt(BUCKET, "m/bad.bin", at=4 * MiB + 1)
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=2))
    async with running(fetcher):
        for obj, verified in ((whole, "CRC32"), (parts, "CRC32-composite")):
            before = STATS.verify_read_bytes
            dl = await fetch_whole(fetcher, obj)
            assert dl.complete and dl.verified == verified, dl.error
            assert STATS.verify_read_bytes == before, f"{obj.key}: read back to verify"
        before = STATS.verify_read_bytes
        dl = await fetch_whole(fetcher, bad)
        assert isinstance(dl.error, IntegrityError) and "CRC32" in str(dl.error), dl.error
        assert STATS.verify_read_bytes > before  # the disk decided, not the sums


@trio_test
async def test_sums_that_do_not_match_decide_nothing_the_disk_does(remote: FakeRemote, stores,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Combined sums that disagree with the store (a bookkeeping slip, say)
    neither refuse the file nor pass it: it is hashed from the disk."""
    data = os.urandom(3 * MiB + 7)
    obj = remote.put(BUCKET, "m/c.bin", data, checksum="CRC32")

    def wrong(self, fd, exp, cancelled=lambda: False):  # type: ignore[no-untyped-def]
        return verify.Hashed(exp, self.size, "AAAAAA==")

    monkeypatch.setattr(piecesums.PieceSums, "hashed", wrong)
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=2))
    async with running(fetcher):
        before = STATS.verify_read_bytes
        dl = await fetch_whole(fetcher, obj)
        assert dl.complete and dl.verified == "CRC32", dl.error
        assert STATS.verify_read_bytes - before == len(data)


@trio_test
async def test_a_store_that_lists_no_checksum_is_asked_for_one_with_the_first_get(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big file whose listing names no checksum (SeaweedFS keeps a CRC but
    lists none), fetched in the background (a prefetch, a next shard), has
    its HEAD sent with the first GET, not after its answer: the CRC it names
    is summed from the first piece, nothing is read back.  The GETs are held
    until the sums have started; without the early HEAD they would wait for
    good (the HEAD waits for their answer).  An open's download does not
    send it before its first response: it would delay the reader's first
    bytes."""
    monkeypatch.setattr(completion, "ASK_FOR_A_CHECKSUM_FROM", 1 * MiB)
    data = os.urandom(6 * MiB + 123)
    prefetched = remote.put(BUCKET, "m/s.bin", data, checksum="CRC32", lists_checksum=False)
    opened = remote.put(BUCKET, "m/o.bin", data[::-1], checksum="CRC32", lists_checksum=False)
    assert not prefetched.checksum_algorithm
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=2))
    async with running(fetcher):
        held = Gate("m/o.bin")
        remote.gates.append(held)
        dl = await fetcher.acquire(opened)
        assert isinstance(dl, Download)
        try:
            await wait_for(lambda: held.waiting, "the open's first GET")
            await trio.sleep(0.2)
            assert [c.key for c in remote.calls if c.op == "HEAD"] == [], "a HEAD before the open's first response"
        finally:
            held.release()
        await dl.finished.wait()
        assert dl.complete and dl.verified == "CRC32", dl.error

        held = Gate("m/s.bin")
        remote.gates.append(held)
        before = STATS.verify_read_bytes
        dl = await fetcher.acquire(prefetched, background=True)
        assert isinstance(dl, Download)
        try:
            await wait_for(lambda: dl.sums.algorithm == "CRC32", "the HEAD's checksum before any byte", timeout=5)
        finally:
            held.release()
        await dl.finished.wait()
        assert dl.complete and dl.verified == "CRC32", dl.error
        assert STATS.verify_read_bytes == before, "read back to verify"
    assert [c.key for c in remote.calls if c.op == "HEAD"] == ["m/o.bin", "m/s.bin"]


@trio_test
async def test_a_head_sent_with_the_first_get_is_not_sent_again(remote: FakeRemote, stores,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when what it answered leaves nothing to check against (an SSE-KMS
    object: no checksum, no MD5 in its ETag), the HEAD sent with the first
    GET is the download's only one."""
    monkeypatch.setattr(completion, "ASK_FOR_A_CHECKSUM_FROM", 1 * MiB)
    asked = []

    def nothing_to_check(remote, obj, meta=None):  # type: ignore[no-untyped-def]
        asked.append(meta)
        remote.head(obj.bucket, obj.key, etag=obj.etag)

    monkeypatch.setattr(alongside, "expectation", nothing_to_check)
    monkeypatch.setattr(completion, "expectation", nothing_to_check)
    dl = await fetch_new(remote, stores, "m/kms.bin", 6 * MiB + 5, background=True)
    assert dl.complete and dl.verified == "unverified", dl.error
    # Asked with the first GET (no response yet), then at the finish, which has no digest to go by.
    assert len(asked) == 2 and asked[0] is None and asked[1] is not None, asked
    assert [c.op for c in remote.calls].count("HEAD") == 2


@trio_test
async def test_a_failed_head_sent_with_the_first_get_leaves_the_etag_check_without_a_second(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """The HEAD that asks a big file's store for a checksum it may keep fails:
    the file is checked by the MD5 its GETs' ETag carries, hashed as it
    fills, and that HEAD is not sent a second time."""
    monkeypatch.setattr(completion, "ASK_FOR_A_CHECKSUM_FROM", 1 * MiB)
    heads = []

    def failing(bucket: str, key: str, etag: str | None = None) -> None:
        heads.append(key)
        raise RemoteUnavailable(f"s3://{bucket}/{key}: HEAD answered 500 (test)", bucket=bucket, key=key)

    monkeypatch.setattr(remote, "head", failing)
    dl = await fetch_new(remote, stores, "m/h.bin", 6 * MiB + 9, background=True)
    assert dl.complete and dl.verified == "MD5", dl.error
    assert heads == ["m/h.bin"]


def safetensors_file(tensors: dict[str, int], block: int) -> bytes:
    """A safetensors file whose tensors (name -> bytes) lie in the given order."""
    import json
    import struct

    meta, pos = {}, 0
    for name, nbytes in tensors.items():
        meta[name] = {"dtype": "BF16", "shape": [nbytes // 2], "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(meta).encode()
    raw += b" " * (-(len(raw) + 8) % block)  # the header fills whole blocks
    return struct.pack("<Q", len(raw)) + raw + os.urandom(pos)


@trio_test
async def test_a_safetensors_file_is_fetched_in_the_order_loaders_read_tensors(remote: FakeRemote,
                                                                              stores) -> None:
    """Issue 13.6: after the header, the sweep follows tensor names, not the file.
    The order is learned in a thread once the header is on disk, and the sweep
    does not wait for it: here z's blocks are held at the server until it is
    learned, so that a loaded machine (a parallel run) cannot send them all
    in file order first."""
    data = safetensors_file({"z.last": 3 * BLOCK, "a.first": 2 * BLOCK, "m.middle": 2 * BLOCK}, BLOCK)
    obj = remote.put(BUCKET, "m/model-00001-of-00002.safetensors", data)
    z_blocks = remote.gate(obj.key, start=BLOCK, end=4 * BLOCK)
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=1))
    async with running(fetcher):
        dl = await fetcher.acquire(obj, background=True)
        assert isinstance(dl, Download)
        await wait_for(lambda: dl.order is not None, "the tensors' order, read from the header")
        z_blocks.release()
        await dl.finished.wait()
        assert dl.complete
    starts = [g.start // BLOCK for g in remote.gets()]
    header_blocks = 1
    z, a, mid = (range(header_blocks, header_blocks + 3), range(4, 6), range(6, 8))
    # (the request after the header may have left before the header was read)
    assert starts.index(a[-1]) < starts.index(mid[-1]) < starts.index(z[-1]), starts


@trio_test
async def test_reading_a_shard_through_starts_the_next_one_once_its_last_bytes_are_on_their_way(
        remote: FakeRemote, stores) -> None:
    """Issue 13.6: the next shard starts when a reader has read most of the
    opened one and that one has nothing left to request; not at the open (a
    reader of a few tensors would pay for the next shard with the connections
    and the CPU its own reads need)."""
    data = os.urandom(8 * BLOCK)
    first = remote.put(BUCKET, "m/model-00001-of-00002.safetensors", data)
    second = remote.put(BUCKET, "m/model-00002-of-00002.safetensors", os.urandom(MiB))
    held = remote.gate(first.key, start=7 * BLOCK)  # the last block's request stays on the wire
    fetcher = Fetcher(remote, stores(), fetch_config(part_size=BLOCK, max_connections=4))
    async with running(fetcher):
        handles = Handles(fetcher)
        handles.next_shard = lambda obj: second if obj == first else None
        fh = await handles.open(first)
        assert bytes(await handles.read(fh, 0, BLOCK)) == data[:BLOCK]
        await wait_for(lambda: held.waiting, "the shard's last request")
        for i in range(1, 5):  # 5 of 8 blocks read: less than three quarters
            assert bytes(await handles.read(fh, i * BLOCK, BLOCK)) == data[i * BLOCK:(i + 1) * BLOCK]
        await trio.sleep(0.3)
        assert not remote.gets(second.key), "the next shard started before its reader read most of this one"
        for i in range(5, 7):
            await handles.read(fh, i * BLOCK, BLOCK)
        await wait_for(lambda: remote.gets(second.key), "the next shard to start")
        ours = [c for c in remote.gets() if c.key in (first.key, second.key)]
        before = ours[:ours.index(remote.gets(second.key)[0])]
        assert {c.start // BLOCK for c in before} == set(range(8)), \
            "the next shard started before the opened one's last request"
        held.release()
        handles.release(fh)

    # Before the last request is out, reading through does not start it yet.
    remote.calls.clear()
    held = remote.gate(first.key, start=0, end=BLOCK)  # the slow start waits on the first request
    fetcher = Fetcher(remote, stores("slow"), fetch_config(part_size=BLOCK, max_connections=4))
    async with running(fetcher):
        handles = Handles(fetcher)
        handles.next_shard = lambda obj: second if obj == first else None
        fh = await handles.open(first)
        await wait_for(lambda: held.waiting, "the shard's first request")
        handles._open[fh].served = 7 * BLOCK  # as if a reader had been served that much
        handles._read_through(handles._open[fh])
        await trio.sleep(0.3)
        assert not remote.gets(second.key), "the next shard started while this one had blocks to request"
        held.release()
        await wait_for(lambda: remote.gets(second.key), "the next shard to start")
        handles.release(fh)

    # A shard in the store: reading it through starts the next one at once;
    # opening it and reading a little does not.
    remote.calls.clear()
    fetcher = Fetcher(remote, stores("again"), fetch_config(part_size=BLOCK))
    async with running(fetcher):
        dl = await fetcher.acquire(first)
        assert isinstance(dl, Download)
        await dl.finished.wait()
        handles = Handles(fetcher)
        handles.next_shard = lambda obj: second if obj == first else None
        fh = await handles.open(first)
        await handles.read(fh, 0, BLOCK)
        await trio.sleep(0.2)
        assert not remote.gets(second.key)
        await handles.read(fh, BLOCK, 6 * BLOCK)
        await wait_for(lambda: remote.gets(second.key), "the next shard to start")
        handles.release(fh)


def test_a_download_waiting_to_be_discarded_is_never_resumed(remote: FakeRemote, stores,
                                                              tmp_path: Path) -> None:
    """A failed download's files are removed only once its threads let go (up
    to 30 s); an open in between must start a fresh file, not resume the old
    one and then lose it to the late removal."""
    data = os.urandom(4 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    store = stores()
    failed = store.partials.open(obj, BLOCK)
    os.pwrite(failed.fd, data[:2 * BLOCK], 0)
    failed.save_state({0, 1})
    store.partials.condemn(failed)  # what Runner.fail does before the removal is scheduled

    fresh = store.partials.open(obj, BLOCK)
    assert fresh.ino != failed.ino and fresh.done == set()
    store.partials.discard(failed)  # the late removal: not the new file's
    os.pwrite(fresh.fd, data, 0)
    store.publish(fresh)
    assert (tmp_path / "store" / "m/w.bin").read_bytes() == data
    failed.close()
    fresh.close()

    # Once discarded, the name is free again: a later interrupted download resumes as usual.
    again = remote.put(BUCKET, "m/x.bin", data)
    first = store.partials.open(again, BLOCK)
    os.pwrite(first.fd, data[:BLOCK], 0)
    first.save_state({0})
    first.close()
    resumed = store.partials.open(again, BLOCK)
    assert resumed.done == {0}
    resumed.close()


@trio_test
async def test_a_want_file_demands_a_bounded_number_of_blocks(remote: FakeRemote, stores) -> None:
    """The want file is another process's writing: a line naming the whole
    file (or nonsense) demands at most WANT_MAX_BLOCKS blocks, never a loop
    over all of them on the trio thread.  While followers want, the resume
    record (what they see) is saved at the faster pace."""
    from lazyfs.download import RECORD_EVERY_S, RECORD_FOLLOWED_S, WANT_MAX_BLOCKS

    obj = remote.put(BUCKET, "m/w.bin", os.urandom(64 * BLOCK))
    held = remote.gate(obj.key)  # nothing lands while we look
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=1))
    async with running(fetcher):
        dl = await fetcher.acquire(obj, background=True)
        assert isinstance(dl, Download)
        await wait_for(lambda: held.waiting, "the first request")
        assert dl.record_every() == RECORD_EVERY_S
        assert dl.want(0, 1 << 62)
        assert dl.record_every() == RECORD_FOLLOWED_S, "followers see only what the record names: record faster"
        assert 0 < len(dl.demand) <= WANT_MAX_BLOCKS
        assert not dl.want(-1, BLOCK) and not dl.want(5 * BLOCK, 5 * BLOCK) and not dl.want(obj.size, obj.size + 1)
        n = len(dl.demand)
        assert not dl.want(0, 4 * BLOCK) and len(dl.demand) == n, "blocks already demanded were added again"
        held.release()
        await dl.finished.wait()
        assert dl.complete


@trio_test
async def test_a_take_over_carries_which_readers_lazyfs_serves(remote: FakeRemote, stores) -> None:
    """When the owner dies, the follower's readers become readers of its own
    download: a handle lazyfs serves stays one (its bytes are written through
    the page cache), a whole-file open waiting for the publish does not (it
    would let them go to the disk with O_DIRECT), and each release reaches
    the new download."""
    data = os.urandom(8 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    owner, lock, part = another_process_downloading(stores, obj, data, {0})
    gate = remote.gate(obj.key, start=BLOCK)  # the follower's own GETs wait until checked
    follower = Fetcher(remote, stores(), fetch_config(store_writes="direct"))
    async with running(follower):
        handles = Handles(follower)
        fh = await handles.open(obj)
        foreign = handles._open[fh].download
        assert isinstance(foreign, ForeignDownload)
        assert bytes(await handles.read(fh, 0, 4096)) == data[:4096]
        foreign.add_reader(served=False)  # a whole-file open waiting beside the handle
        direct_before = STATS.direct_bytes
        part.close()
        owner.partials.unlock(obj, lock)  # the owner is gone
        await wait_for(lambda: foreign.delegate is not None, "the follower takes the download over")
        own = foreign.delegate
        assert isinstance(own, Download)
        assert (own.readers, own.served) == (2, 1)
        await wait_for(lambda: gate.waiting, "the follower's GET in flight")
        gate.release()
        with trio.fail_after(10):
            assert bytes(await handles.read(fh, 0, len(data))) == data
        assert STATS.direct_bytes == direct_before, "bytes a served reader reads went to the disk past the page cache"
        handles.release(fh)
        assert (own.readers, own.served) == (1, 0)
        foreign.drop_reader(served=False)
        assert (own.readers, own.served) == (0, 0)
    assert remote.count("GET") >= 1


@trio_test
async def test_an_open_refused_a_descriptor_names_the_file_in_one_store_error(remote: FakeRemote, stores,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Near the descriptor limit, mapping a cached file (mmap takes a
    descriptor of its own) failed with a bare EMFILE: the open's log line
    named no file.  It is a store error naming the object and the limit, errno kept."""
    data = os.urandom(2 * BLOCK)
    obj = remote.put(BUCKET, "many/f1.bin", data)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        assert bytes(await handles.read(fh, 0, len(data))) == data
        handles.release(fh)
        await wait_for(lambda: fetcher.active(obj) is None, "the publish")

        def out_of_descriptors(*args: object) -> None:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))  # as mmap's dup says it: no name

        monkeypatch.setattr(handles_module, "FileMap", out_of_descriptors)
        with pytest.raises(StoreError) as info:
            await handles.open(obj)
        assert info.value.errno == errno.EMFILE
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert str(info.value).startswith(f'"s3://{BUCKET}/many/f1.bin": cannot open it from the store: too many open '
                                          f"files: the daemon's descriptor limit (ulimit -n / RLIMIT_NOFILE) is {soft}")


@trio_test
async def test_a_download_failing_as_the_engine_stops_gives_its_lock_back(remote: FakeRemote, stores) -> None:
    """A download fails (its object store refuses it) and the engine stops
    before the unlock its failure spawned had a thread.  Before, that task
    was cancelled at its first checkpoint and the download's lock stayed
    held for as long as the process lived: `status --store` would call the
    file `downloading`, and another engine of this process could never take
    it.  Now the unlock runs whatever the stop."""
    from lazyfs.errors import AccessDenied

    obj = remote.put(BUCKET, "m/a.bin", os.urandom(300 * KiB))
    remote.fail_gets[obj.key] = [AccessDenied("access denied to s3://bkt/m/a.bin", bucket=BUCKET, key=obj.key)]
    store = stores()
    fetcher = Fetcher(remote, store, fetch_config())
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(obj)
        with pytest.raises(LazyfsError):
            await handles.read(fh, 0, 4096)
        handles.release(fh)
        # the engine stops here, at once: the failure's unlock task has not run yet
    other = stores()
    lock = other.partials.lock(obj)
    assert lock is not None, "the failed download's lock is still held"
    other.partials.unlock(obj, lock)
