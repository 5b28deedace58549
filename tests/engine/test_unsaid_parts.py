"""Engine tests: multipart objects on a store that cannot say its part sizes
(Ceph RGW and s3rver ignore partNumber; FakeRemote says_parts=False).

A one-part upload (ETag "...-1") is checked exactly: its one part is the
whole object.  Before, it was published unverified ("the object store offers
nothing to check it against"), corrupted or not."""

from __future__ import annotations

import os
from pathlib import Path

from lazyfs.download import Download
from lazyfs.errors import IntegrityError
from lazyfs.fetch import Fetcher
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
