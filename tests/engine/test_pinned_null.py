"""A file a lock pins by ETag because it was written before the bucket's
versioning was turned on (S3's version "null"), overwritten since: S3 keeps
the locked bytes as version null.  A pinned mount fetches them so
(`?versionId=null`, with If-Match on the locked ETag), and a drift check does
not count them as lost; where version null is gone too, or the store refuses
the id, the file is ESTALE as before."""

from __future__ import annotations

import errno
import os

import pytest
import trio
from test_pinning import SOURCES, pinned, read_all

from lazyfs import lockcmd
from lazyfs.drift import DriftWatch
from lazyfs.errors import PinnedVersionGone, RemoteError, errno_of
from lazyfs.lister import Lister
from lazyfs.lockfile import Lock
from lazyfs.namespace import RemoteObject
from support.enginekit import BUCKET, running, trio_test
from support.fakeremote import FakeRemote

KiB = 1024
KEY = "m/w.bin"


async def locked_then_overwritten(remote: FakeRemote) -> tuple[Lock, bytes]:
    """Put before versioning is on, locked (by ETag), then overwritten."""
    locked = os.urandom(600 * KiB)
    remote.put(BUCKET, KEY, locked)
    remote.keep_versions(BUCKET)
    lock = await lockcmd.make_lock(remote, SOURCES, [])
    assert not next(lock.entries()).version_id
    remote.put(BUCKET, KEY, os.urandom(600 * KiB))
    return lock, locked


@trio_test
async def test_a_file_locked_before_versioning_is_served_as_version_null_after_an_overwrite(
        remote: FakeRemote, stores) -> None:
    """Before, the read failed with ESTALE though the bucket kept the bytes."""
    lock, locked = await locked_then_overwritten(remote)
    fetcher, pin = pinned(remote, stores(), lock)
    remote.calls.clear()
    async with running(fetcher):
        assert await read_all(fetcher, lock, KEY) == locked
    gets = remote.gets(KEY)
    assert gets[0].version_id == "", "the key first (what it holds may be the locked bytes)"
    assert {g.version_id for g in gets} == {"", "null"}
    # (600 KiB in 256 KiB requests: only those sent before the first learnt it ask the key)
    assert sum(1 for g in gets if not g.version_id) <= 3, "once found as null, asked for as null"
    assert pin.unavailable() == []
    watch = DriftWatch(pin, Lister(pin.store, trio.CapacityLimiter(8)), SOURCES, 0)
    drift = await watch.check_once()
    assert drift.changed == (KEY,), "the key holds another object: drift, reported"
    assert pin.unavailable() == [], "but not a locked file the bucket no longer has"


@trio_test
async def test_version_null_holding_other_bytes_is_never_served(remote: FakeRemote, stores) -> None:
    """Version null deleted (or replaced while versioning was suspended): ESTALE, one line, as before."""
    lock, _ = await locked_then_overwritten(remote)
    remote.delete_version(BUCKET, KEY, "null")
    fetcher, pin = pinned(remote, stores(), lock)
    async with running(fetcher):
        with pytest.raises(PinnedVersionGone) as info:
            await read_all(fetcher, lock, KEY)
    assert errno_of(info.value) == errno.ESTALE
    assert "which is no longer the object at that key, and which the bucket does not serve as version null" \
        in str(info.value)
    assert pin.unavailable() == [KEY]


@trio_test
async def test_a_store_that_refuses_version_null_keeps_the_old_estale(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    lock, _ = await locked_then_overwritten(remote)
    get_range = remote.get_range

    def refusing(obj: RemoteObject, start: int, end: int) -> object:
        if obj.version_id == "null":
            raise RemoteError(f"{obj.uri}: InvalidArgument: Invalid version id specified", bucket=obj.bucket,
                              key=obj.key)
        return get_range(obj, start, end)

    monkeypatch.setattr(remote, "get_range", refusing)
    fetcher, pin = pinned(remote, stores(), lock)
    async with running(fetcher):
        with pytest.raises(PinnedVersionGone) as info:
            await read_all(fetcher, lock, KEY)
    assert errno_of(info.value) == errno.ESTALE
    assert pin.unavailable() == [KEY]


@trio_test
async def test_a_drift_check_refuses_a_file_once_version_null_is_gone_and_takes_it_back(
        remote: FakeRemote, stores) -> None:
    lock, _ = await locked_then_overwritten(remote)
    _, pin = pinned(remote, stores(), lock)
    watch = DriftWatch(pin, Lister(pin.store, trio.CapacityLimiter(8)), SOURCES, 0)
    remote.calls.clear()
    await watch.check_once()
    assert pin.unavailable() == []
    heads = [c for c in remote.calls if c.op == "HEAD"]
    assert [(c.key, c.version_id) for c in heads] == [(KEY, "null")], "one HEAD ?versionId=null, nothing fetched"
    kept = remote.history[(BUCKET, KEY)][0]
    remote.delete_version(BUCKET, KEY, "null")
    await watch.check_once()
    assert pin.unavailable() == [KEY]
    remote.history[(BUCKET, KEY)].insert(0, kept)  # (restored, as by a copy back)
    await watch.check_once()
    assert pin.unavailable() == []
