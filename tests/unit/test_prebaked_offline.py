"""Unit tests: --verify etag when the object store cannot be reached
(probe.PrebakedCheck).  An unrecorded copy is checked against the listing's
ETag where no request is needed; what could not be checked, or did not match
an ETag that may not be an MD5, is judged again after the next listing.

Before, the check's HEAD failed, the copy was taken by its size, and that
verdict was kept for the process's life: wrong bytes were served offline and
after the object store came back."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from lazyfs.errors import RemoteUnavailable
from lazyfs.filestate import REJECTED
from lazyfs.namespace import RemoteObject
from lazyfs.probe import PrebakedCheck
from lazyfs.store import Store
from support.fakeremote import FakeRemote

MiB = 1024 * 1024


class _Flaky:
    """A remote that cannot be reached while `down` (every HEAD fails), and
    whose ETags are not MD5s when `sse_kms`."""

    def __init__(self, inner: FakeRemote) -> None:
        self.inner = inner
        self.down = True
        self.sse_kms = False

    def head(self, bucket: str, key: str, etag: str | None = None) -> Any:
        if self.down:
            raise RemoteUnavailable(f"s3://{bucket}/{key}: cannot connect", bucket=bucket, key=key)
        info = self.inner.head(bucket, key, etag)
        return dataclasses.replace(info, checksum=None, etag_is_md5=False) if self.sse_kms else info

    def part(self, obj: RemoteObject, number: int) -> Any:
        return None if self.down else self.inner.part(obj, number)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[tuple[FakeRemote, _Flaky, Store, Path]]:
    (tmp_path / "s").mkdir()
    (tmp_path / "layer" / "m").mkdir(parents=True)
    s = Store.open(str(tmp_path / "s"), [str(tmp_path / "layer")])
    remote = FakeRemote()
    try:
        yield remote, _Flaky(remote), s, tmp_path / "layer"
    finally:
        s.close()


def judged(check: PrebakedCheck, s: Store, o: RemoteObject) -> bool:
    copy = s.find_current(o)
    assert copy is not None
    try:
        return check(o, copy)
    finally:
        os.close(copy.fd)


def verified(check: PrebakedCheck, s: Store, o: RemoteObject) -> str:
    return s.local_state(o, check.checked).verified


def test_offline_a_copy_is_checked_against_the_listed_md5_etag(layer) -> None:
    remote, flaky, s, pb = layer
    right, wrong = remote.put("bkt", "m/config.json", b"{}" * 500), remote.put("bkt", "m/tok.json", b"t" * 1000)
    (pb / "m" / "config.json").write_bytes(b"{}" * 500)
    (pb / "m" / "tok.json").write_bytes(b"t" * 999 + b"X")  # the size matches, one byte does not
    listings = [0]
    check = PrebakedCheck(flaky, s, listings=lambda: listings[0])
    assert judged(check, s, right) and verified(check, s, right) == "MD5"
    assert not judged(check, s, wrong), "the wrong bytes were served"
    assert verified(check, s, wrong) == "" and s.local_state(wrong, check.checked).state == "stale"
    assert check.checked(wrong, s.prebaked[0], os.stat(pb / "m" / "tok.json")) == REJECTED
    # The object store answers again (a listing succeeded): the mismatch is confirmed with it; the match
    # is final and not hashed or asked about again.
    flaky.down, listings[0] = False, 1
    assert not judged(check, s, wrong)
    assert judged(check, s, right)
    assert [c.key for c in remote.calls if c.op == "HEAD"] == ["m/tok.json", "m/tok.json"]
    assert not check.withdrawn(wrong), "it was never served"


@pytest.mark.parametrize("why", ["multipart", "no-etag-check"])
def test_a_copy_nothing_could_check_offline_is_served_by_size_until_the_next_listing(layer, why: str) -> None:
    remote, flaky, s, pb = layer
    data = os.urandom(6 * MiB + 1000)
    if why == "multipart":  # two parts of 6 MiB: no common uploader's size, and no store to ask
        o = remote.put("bkt", "m/w.safetensors", data, parts=(6 * MiB, 1000))
    else:
        o = remote.put("bkt", "m/w.safetensors", data, checksum="CRC32")
    (pb / "m" / "w.safetensors").write_bytes(b"\0" + data[1:])
    listings = [3]
    check = PrebakedCheck(flaky, s, etag_is_md5=why != "no-etag-check", listings=lambda: listings[0])
    assert judged(check, s, o) and verified(check, s, o) == "size"  # the seed's rule, offline
    heads = remote.count("HEAD")
    assert judged(check, s, o), "judged once while nothing changed"
    assert remote.count("HEAD") == heads
    flaky.down, listings[0] = False, 4
    assert not judged(check, s, o), "not checked once the object store answered"
    assert s.local_state(o, check.checked).state == "stale"
    assert check.withdrawn(o) and not check.withdrawn(o), "said once: the kernel's pages of it must go"


def test_an_etag_that_is_not_an_md5_is_not_held_against_the_copy_once_the_store_says_so(layer) -> None:
    """SSE-KMS: the listed ETag looks like an MD5 and is not one.  Offline the copy is not served (nothing
    tells the ETag apart from an MD5 there); once the store answers that it is not one, it is served by size."""
    remote, flaky, s, pb = layer
    o = dataclasses.replace(remote.put("bkt", "m/kms.bin", b"k" * 100), etag="0" * 32)
    (pb / "m" / "kms.bin").write_bytes(b"k" * 100)
    listings = [0]
    check = PrebakedCheck(flaky, s, listings=lambda: listings[0])
    assert not judged(check, s, o)
    flaky.down, flaky.sse_kms, listings[0] = False, True, 1
    remote.objects[("bkt", "m/kms.bin")].etag = "0" * 32  # what the store answers, as listed
    assert judged(check, s, o) and verified(check, s, o) == "size"
