"""An object replaced after every GET of its download was answered: the HEAD
verification sends afterwards (for a checksum the listing names, or one the
store may keep for a big file) gets 412.  The GETs carried If-Match on the
listed ETag, so the bytes on disk are all the listed version's: the file is
checked by its ETag and published, and its readers get every byte (it was
thrown away, and they got ESTALE)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazyfs import completion, verify
from lazyfs.download import Download
from lazyfs.errors import ObjectChanged
from lazyfs.fetch import Fetcher
from lazyfs.filestate import LocalCopy
from lazyfs.handles import Handles
from lazyfs.objectstore import HeadInfo
from lazyfs.verify import Part
from support.enginekit import BUCKET, fetch_config, running, trio_test
from support.fakeremote import FakeRemote

MiB = 1024 * 1024


def replaced_at_head(remote: FakeRemote) -> list[int]:
    """Every HEAD that asks for the listed version gets 412, as once the
    object was overwritten; a part's HEAD (no If-Match) is recorded: it
    would describe the new object.  Returns the parts asked for."""
    parts_asked: list[int] = []

    def head(bucket: str, key: str, etag: str | None = None) -> HeadInfo:
        if etag:
            raise ObjectChanged(f"s3://{bucket}/{key} changed in the object store", bucket=bucket, key=key)
        return FakeRemote.head(remote, bucket, key, etag)

    def part(obj: object, number: int) -> Part | None:
        parts_asked.append(number)
        return Part(3 * MiB, 2)  # the new object's parts: nothing like the listed version's

    remote.head = head  # type: ignore[method-assign]
    remote.part = part  # type: ignore[assignment, method-assign]
    return parts_asked


@pytest.mark.parametrize("kind, verified", [
    ("single", "MD5"),  # a big file asked for a checksum the store may keep
    ("checksum listed", "MD5"),  # the listing names a checksum the ranged GETs do not carry
    ("multipart", "MD5-multipart"),  # cut at a common uploader's part size, not the new object's
])
@trio_test
async def test_a_412_on_the_head_after_the_gets_leaves_the_file_checked_by_its_etag(
        remote: FakeRemote, stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
        verified: str) -> None:
    monkeypatch.setattr(completion, "ASK_FOR_A_CHECKSUM_FROM", MiB)
    monkeypatch.setattr(verify, "COMMON_PART_SIZES", (MiB,))
    data = os.urandom(3 * MiB + 12345)
    obj = remote.put(BUCKET, "m/big.bin", data, checksum="CRC32" if kind == "checksum listed" else "",
                     parts=(MiB, MiB, MiB, 12345) if kind == "multipart" else ())
    parts_asked = replaced_at_head(remote)
    fetcher = Fetcher(remote, stores(), fetch_config())
    handles = Handles(fetcher)
    async with running(fetcher):
        fh = await handles.open(obj)
        [dl] = fetcher.downloads()
        assert isinstance(dl, Download)
        assert bytes(await handles.read(fh, 0, obj.size)) == data
        handles.release(fh)
        await dl.finished.wait()
        assert dl.error is None and dl.complete, dl.error
        assert dl.verified == verified
        copy = await fetcher.acquire(obj)
        assert isinstance(copy, LocalCopy), "the complete download was not published"
        os.close(copy.fd)
    assert parts_asked == [], "asked the replaced object for its part sizes"
    assert (tmp_path / "store" / "m" / "big.bin").read_bytes() == data


@trio_test
async def test_a_multipart_etag_that_no_common_part_size_makes_is_published_unverified(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the store's part sizes describing another object, a multipart
    ETag of part sizes no common uploader uses cannot be checked: the
    documented fallback for nothing to check against, published unverified."""
    monkeypatch.setattr(completion, "ASK_FOR_A_CHECKSUM_FROM", MiB)
    data = os.urandom(3 * MiB)
    obj = remote.put(BUCKET, "m/odd.bin", data, parts=(MiB, MiB, MiB))
    parts_asked = replaced_at_head(remote)
    fetcher = Fetcher(remote, stores(), fetch_config())
    handles = Handles(fetcher)
    async with running(fetcher):
        fh = await handles.open(obj)
        [dl] = fetcher.downloads()
        assert bytes(await handles.read(fh, 0, obj.size)) == data
        handles.release(fh)
        await dl.finished.wait()
        assert dl.error is None and dl.complete and dl.verified == completion.UNVERIFIED, dl.error
    assert parts_asked == []
