"""Engine tests: multipart objects on a store that cannot say its part sizes
(Ceph RGW and s3rver ignore partNumber; FakeRemote says_parts=False).

A one-part upload (ETag "...-1") is checked exactly: its one part is the
whole object.  Before, it was published unverified ("the object store offers
nothing to check it against"), corrupted or not."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lazyfs.download import Download
from lazyfs.errors import IntegrityError
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.namespace import RemoteObject
from lazyfs.probe import PrebakedCheck
from lazyfs.store import Store
from support.enginekit import BUCKET, fetch_config, running, trio_test
from support.fakeremote import FakeRemote

MiB = 1024 * 1024


async def fetch_whole(fetcher: Fetcher, obj: RemoteObject) -> Download:
    dl = await fetcher.acquire(obj)
    assert isinstance(dl, Download)
    await dl.finished.wait()
    return dl


@trio_test
async def test_a_one_part_upload_verifies_where_the_store_cannot_say_its_parts(remote: FakeRemote, stores,
                                                                             tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)
    good = remote.put(BUCKET, "m/one.bin", data, parts=(len(data),), says_parts=False)
    bad = remote.put(BUCKET, "m/bad.bin", data[::-1], parts=(len(data),), says_parts=False)
    assert good.etag.endswith("-1")
    remote.corrupt(BUCKET, "m/bad.bin", at=MiB + 1)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, good)
        assert dl.complete and dl.verified == "MD5-multipart", dl.error
        dl = await fetch_whole(fetcher, bad)
        assert isinstance(dl.error, IntegrityError), dl.verified
    assert (tmp_path / "store" / "m/one.bin").read_bytes() == data
    assert not (tmp_path / "store" / "m/bad.bin").exists()
    assert not [c for c in remote.calls if c.op == "HEAD" and c.start], "asked for a part's size it knows"


def test_a_prebaked_one_part_copy_is_checked_by_its_etag(tmp_path: Path) -> None:
    """--verify etag: a right copy verifies, a wrong one is not served."""
    (tmp_path / "s").mkdir()
    (tmp_path / "layer" / "m").mkdir(parents=True)
    remote = FakeRemote()
    data = os.urandom(MiB + 3)
    right = remote.put(BUCKET, "m/right.bin", data, parts=(len(data),), says_parts=False)
    wrong = remote.put(BUCKET, "m/wrong.bin", data, parts=(len(data),), says_parts=False)
    (tmp_path / "layer" / "m" / "right.bin").write_bytes(data)
    (tmp_path / "layer" / "m" / "wrong.bin").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    store = Store.open(str(tmp_path / "s"), [str(tmp_path / "layer")])
    try:
        check = PrebakedCheck(remote, store)
        for obj, served in ((right, True), (wrong, False)):
            copy = store.find_current(obj)
            assert copy is not None
            try:
                assert check(obj, copy) is served, obj.key
            finally:
                os.close(copy.fd)
        assert store.local_state(right, check.checked).verified == "MD5-multipart"
    finally:
        store.close()


def gets_bytes(remote: FakeRemote, key: str) -> int:
    return sum(g.end - g.start for g in remote.gets(key))


@trio_test
async def test_bytes_no_assumed_part_size_confirms_are_downloaded_again_and_refused_if_they_differ(
        remote: FakeRemote, stores, tmp_path: Path, caplog) -> None:
    """An upload in boto3's 8 MiB parts, its bytes corrupted in transit (each
    GET from the start differently): no part size the store could confirm, so
    before, it was published "unverified"; now it is fetched once more and
    hashed, the two differ: bad bytes, never published (each of the runner's
    two attempts a download and a second look)."""
    caplog.set_level(logging.INFO, logger="lazyfs")
    data = os.urandom(19 * MiB)
    obj = remote.put(BUCKET, "m/flip.bin", data, parts=(8 * MiB, 8 * MiB, 3 * MiB), says_parts=False)
    firsts: list[int] = []

    def flip(call) -> None:  # type: ignore[no-untyped-def]
        if call.key == obj.key and call.start == 0:
            firsts.append(1)
            remote.corrupt(BUCKET, obj.key, at=len(firsts))  # the first GET's byte 1, the next's byte 2 too
    remote.on_get.append(flip)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, obj)
        assert isinstance(dl.error, IntegrityError) and not dl.complete, dl.verified
    assert "the bytes fetched once more differ" in str(dl.error)
    assert "fetching it once more to compare" in caplog.text
    assert not (tmp_path / "store" / "m/flip.bin").exists()
    assert gets_bytes(remote, obj.key) == 2 * 2 * len(data)


@trio_test
async def test_bytes_corrupted_once_verify_by_the_second_download(remote: FakeRemote, stores, tmp_path: Path) -> None:
    data = os.urandom(19 * MiB)
    obj = remote.put(BUCKET, "m/once.bin", data, parts=(8 * MiB, 8 * MiB, 3 * MiB), says_parts=False)
    remote.corrupt(BUCKET, obj.key, at=9 * MiB)
    seen: list[int] = []

    def mend(call) -> None:  # type: ignore[no-untyped-def]
        if call.key == obj.key and call.start == 0:
            seen.append(1)
            if len(seen) == 2:
                remote.corrupt(BUCKET, obj.key, at=9 * MiB)  # flipped back: the second download's bytes are right
    remote.on_get.append(mend)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, obj)
        assert dl.complete and dl.verified == "MD5-multipart", dl.error
    assert (tmp_path / "store" / "m/once.bin").read_bytes() == data


@trio_test
async def test_uncommon_part_sizes_are_published_unverified_after_two_downloads_agree(
        remote: FakeRemote, stores, tmp_path: Path, caplog) -> None:
    """The cost of telling an uploader's uncommon part sizes from bad bytes
    where the store cannot say its parts: the object is fetched twice (the
    second time streamed and hashed, kept nowhere)."""
    data = os.urandom(13 * MiB)
    obj = remote.put(BUCKET, "m/other.bin", data, parts=(6 * MiB, 6 * MiB, MiB), says_parts=False)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        dl = await fetch_whole(fetcher, obj)
        assert dl.complete and dl.verified == "unverified", dl.error
    assert (tmp_path / "store" / "m/other.bin").read_bytes() == data
    assert gets_bytes(remote, obj.key) == 2 * len(data)
    assert "fetched once more, the same bytes" in caplog.text


def test_a_prebaked_copy_no_assumed_part_size_confirms_is_not_served(tmp_path: Path, caplog) -> None:
    """--verify etag: a copy of a boto3 upload with a flipped byte, where the
    store cannot say its part sizes, was served by its size ("its part sizes
    are not known; using it as its size matches"); now it is not, nor one of
    uncommon part sizes (a download can tell those from bad bytes, a copy
    cannot): the object is downloaded instead."""
    (tmp_path / "s").mkdir()
    (tmp_path / "layer" / "m").mkdir(parents=True)
    remote = FakeRemote()
    data = os.urandom(17 * MiB)
    boto3 = remote.put(BUCKET, "m/boto3.bin", data, parts=(8 * MiB, 8 * MiB, MiB), says_parts=False)
    other = remote.put(BUCKET, "m/other.bin", data[::-1], parts=(6 * MiB, 6 * MiB, 5 * MiB), says_parts=False)
    (tmp_path / "layer" / "m" / "boto3.bin").write_bytes(data[:5] + bytes([data[5] ^ 1]) + data[6:])
    (tmp_path / "layer" / "m" / "other.bin").write_bytes(data[::-1])
    store = Store.open(str(tmp_path / "s"), [str(tmp_path / "layer")])
    try:
        check = PrebakedCheck(remote, store)
        for obj in (boto3, other):
            copy = store.find_current(obj)
            assert copy is not None
            try:
                assert check(obj, copy) is False, obj.key
            finally:
                os.close(copy.fd)
    finally:
        store.close()
    assert "not serving it (the object is downloaded instead)" in caplog.text
    assert "using it as its size matches" not in caplog.text


@trio_test
async def test_a_reader_of_a_file_its_second_look_confirms_is_never_failed(remote: FakeRemote, stores,
                                                                           tmp_path: Path) -> None:
    """Uncommon part sizes on a store that cannot say them: a reader holding
    the file open through its first download reads every byte, and nothing
    fails it; the second look happens while its last bytes are held.  (The
    first try downloaded the file again into a new file, and the reader got
    EIO: "bytes this open file read earlier failed verification".)"""
    data = os.urandom(13 * MiB)
    obj = remote.put(BUCKET, "m/held.bin", data, parts=(6 * MiB, 6 * MiB, MiB), says_parts=False)
    fetcher = Fetcher(remote, stores(), fetch_config())
    handles = Handles(fetcher)
    async with running(fetcher):
        fh = await handles.open(obj)
        got = bytearray()
        while len(got) < len(data):
            got += await handles.read(fh, len(got), 4 * MiB)
        handles.release(fh)
        assert bytes(got) == data
        [dl] = [d for d in fetcher.downloads() if isinstance(d, Download)] or [None]
        if dl is not None:
            await dl.finished.wait()
    assert (tmp_path / "store" / "m/held.bin").read_bytes() == data
    assert gets_bytes(remote, obj.key) == 2 * len(data)
