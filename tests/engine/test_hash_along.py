"""Issue 13.3 for multipart ETags: each part is hashed as soon as its bytes
are on disk, whatever order the parts land in, so verification (which a
reader of the whole file waits for at its last blocks) ends with the last
part; and the hashing task of a failed download ends with it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from lazyfs import readback
from lazyfs.download import DONE, Download
from lazyfs.fetch import Fetcher
from lazyfs.stats import STATS
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote
from support.pagecache import cached_pages

KiB, MiB = 1024, 1024 * 1024


def count_hashed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The byte ranges read back for hashing, as they are read."""
    hashed: list[tuple[int, int]] = []
    real = readback.read_into

    def counting(fd, start, end, h, cancelled):  # type: ignore[no-untyped-def]
        hashed.append((start, end))
        real(fd, start, end, h, cancelled)

    monkeypatch.setattr(readback, "read_into", counting)
    return hashed


@trio_test
async def test_the_parts_of_a_multipart_etag_are_hashed_as_they_land_not_in_file_order(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first part is held back: the three parts after it are hashed while
    it is missing (in file order, nothing could be), and once it lands only
    it is left; no byte is hashed twice and the file verifies."""
    hashed = count_hashed(monkeypatch)
    data = os.urandom(4 * MiB)
    obj = remote.put(BUCKET, "m/mp.bin", data, parts=(MiB,) * 4)
    gate = remote.gate("m/mp.bin", 0, 1, in_body=True)  # (the first bytes open the ramp)
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=4))
    async with running(fetcher):
        dl = await fetcher.acquire(obj, background=True)
        assert isinstance(dl, Download)
        await wait_for(lambda: all(st == DONE for st in dl.state[MiB // dl.block_size:]), "parts 2-4 on disk")
        await wait_for(lambda: sum(e - s for s, e in hashed) >= 3 * MiB, "parts 2-4 hashed while part 1 is missing")
        assert all(s >= MiB for s, _ in hashed), hashed
        gate.release()
        await dl.finished.wait()
        assert dl.complete and dl.verified == "MD5-multipart", dl.error
    assert sorted(hashed) == [(i * MiB, (i + 1) * MiB) for i in range(4)], "each part hashed once"


@trio_test
async def test_a_file_of_many_small_parts_is_hashed_part_by_part_and_verifies(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """More parts than are looked at at once (alongside.PARTS_AHEAD), several
    to a block, the last one short: every part is hashed once and the file
    verifies without a second pass over it."""
    hashed = count_hashed(monkeypatch)
    parts = (64 * KiB,) * 40 + (1000,)
    data = os.urandom(sum(parts))
    obj = remote.put(BUCKET, "m/many.bin", data, parts=parts)
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=2))
    async with running(fetcher):
        before = STATS.verify_read_bytes
        dl = await fetcher.acquire(obj)
        assert isinstance(dl, Download)
        await dl.finished.wait()
        assert dl.complete and dl.verified == "MD5-multipart", dl.error
        assert STATS.verify_read_bytes - before == len(data), "hashed again at the end"
    assert len(hashed) == len(parts)


@trio_test
async def test_the_hashing_of_a_failed_download_ends_with_it(remote: FakeRemote, stores) -> None:
    """A download that fails before its bytes are in: the task hashing along
    it ends (it waited for blocks that would never land, holding the
    download, for as long as the mount lived)."""
    for key, parts in (("m/single.bin", ()), ("m/multi.bin", (MiB, MiB))):
        obj = remote.put(BUCKET, key, os.urandom(2 * MiB), parts=parts)
        gate = remote.gate(key, 0)
        fetcher = Fetcher(remote, stores(), fetch_config(max_connections=2, chunk_attempts=1))
        async with running(fetcher):
            dl = await fetcher.acquire(obj, background=True)
            assert isinstance(dl, Download)
            await wait_for(lambda g=gate: g.waiting > 0, "a GET at the gate")
            gate.fail()
            await dl.finished.wait()
            assert dl.error is not None
            with trio.fail_after(5):
                await dl.hashed.wait()


@trio_test
async def test_the_first_bytes_of_a_download_send_the_rest_of_its_sweep(remote: FakeRemote, stores) -> None:
    """The slow start sends one request until its first bytes arrive, then
    the sweep's other requests, without waiting for that first request to
    end (a whole 8 MiB part: ~0.1 s more per cold file on S3, for every
    download no reader was asking blocks of: a whole-file open, a prefetch,
    a checkpoint's next shard)."""
    obj = remote.put(BUCKET, "m/ramp.bin", os.urandom(4 * MiB))
    gate = remote.gate("m/ramp.bin", 0, 1, in_body=True)  # the first request stops after its first piece
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=4))
    async with running(fetcher):
        dl = await fetcher.acquire(obj, background=True)
        assert isinstance(dl, Download)
        await wait_for(lambda: gate.waiting, "the first request's first bytes")
        await wait_for(lambda: len(remote.gets("m/ramp.bin")) >= 4, "the sweep's other requests", timeout=5)
        gate.release()
        await dl.finished.wait()
        assert dl.complete, dl.error


@trio_test
async def test_a_download_checked_by_its_md5_leaves_the_page_cache_to_its_readers(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    """A download nobody reads meanwhile goes to the disk around the page
    cache, and its MD5 reads it back the same way: the daemon copies none of
    it out of newly filled cache pages (readback.py), and the file's readers
    fill the page cache once."""
    data = os.urandom(6 * MiB)
    obj = remote.put(BUCKET, "m/w.bin", data)
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=2))
    async with running(fetcher):
        before = STATS.verify_read_bytes
        dl = await fetcher.acquire(obj, background=True)
        assert isinstance(dl, Download)
        await dl.finished.wait()
        assert dl.complete and dl.verified == "MD5", dl.error
        assert STATS.verify_read_bytes - before == len(data)
    path = tmp_path / "store" / "m" / "w.bin"
    # A few pages: those asked about (a chunk's first and last, read in by the asking), the
    # header's, and now and then a chunk the kernel had its first and last pages of cached
    # by then (tests/unit/test_readback.py).  The old read-back cached all of it.
    pages = len(data) // 4096
    assert cached_pages(path) < pages // 4, "read into the page cache by the download or its verification"
