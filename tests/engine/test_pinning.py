"""Issue 14 at the engine tier: a lock made from one listing and a HEAD per
object; an engine serving it (pinned.Pinning) fetches the locked version by its
id after an overwrite, checks the bytes against the lock and not against
what S3 says, never serves anything in place of a version the bucket lost
(also when it is lost between two ranged GETs of one download), refuses
further opens of it at once, and a drift check reports the bucket's changes
without fetching anything."""

from __future__ import annotations

import dataclasses
import errno
import os

import pytest
import trio

from lazyfs import lockcmd, lockfile
from lazyfs.drift import DriftWatch
from lazyfs.errors import IntegrityError, PinnedVersionGone, RemoteUnavailable, errno_of
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.lister import Lister
from lazyfs.lockfile import Lock
from lazyfs.modeljson import Source
from lazyfs.pinned import Pinning
from lazyfs.prefetch import Prefetcher, Progress
from lazyfs.repeats import RepeatedLines
from lazyfs.store import Store
from lazyfs.verify import Expectation
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote

KiB, MiB = 1024, 1024 * 1024
P = "m/"
SOURCES = [Source(BUCKET, P)]


def pinned(remote: FakeRemote, store: Store, lock: Lock, origin: str = "fetch",
           **cfg: object) -> tuple[Fetcher, Pinning]:
    """An engine serving `lock`, wired as `lazyfs mount --lock` (or, with
    origin "bake", `lazyfs bake --lock`) wires it."""
    pin = Pinning(lock, remote)
    config = fetch_config(**cfg)
    fetcher = Fetcher(pin.store, store, config, origin=origin, fetch_range=pin.transfer(remote, config),
                      pinned=True)
    fetcher.hooks.refuse = pin.refuse
    return fetcher, pin


async def read_all(fetcher: Fetcher, lock: Lock, key: str) -> bytes:
    obj = next(o for o in lock.objects() if o.key == key)
    handles = Handles(fetcher)
    fh = await handles.open(obj)
    try:
        return bytes(await handles.read(fh, 0, obj.size))
    finally:
        handles.release(fh)


@trio_test
async def test_a_lock_is_one_listing_and_a_head_per_object(remote: FakeRemote) -> None:
    remote.keep_versions(BUCKET)
    remote.put(BUCKET, "m/config.json", b"{}")
    remote.put(BUCKET, "m/tok.json", b"tok" * 100, checksum="CRC32")
    remote.put(BUCKET, "m/w.bin", os.urandom(3 * MiB), parts=(MiB, MiB, MiB))
    lock = await lockcmd.make_lock(remote, SOURCES, [])
    assert remote.count("LIST") == 1
    assert len([c for c in remote.calls if c.op == "HEAD" and c.start == 0]) == 3, "one HEAD per object"
    checks = {e.key: e.check for e in lock.entries()}
    assert checks["m/tok.json"].algorithm == "CRC32"
    assert checks["m/config.json"] == Expectation("MD5", remote.objects[(BUCKET, "m/config.json")].etag)
    assert checks["m/w.bin"].algorithm == "MD5-multipart" and checks["m/w.bin"].part_sizes == (MiB,) * 3
    assert all(e.version_id == remote.version_ids(BUCKET, e.key)[0] for e in lock.entries())
    assert lockfile.parse(lockfile.dumps(lock), "x").folders == lock.folders


@trio_test
async def test_an_overwrite_in_a_versioned_bucket_changes_nothing(remote: FakeRemote, stores) -> None:
    remote.keep_versions(BUCKET)
    approved = os.urandom(MiB + 5)
    remote.put(BUCKET, "m/w.bin", approved, checksum="CRC32")
    lock = await lockcmd.make_lock(remote, SOURCES, [])
    remote.put(BUCKET, "m/w.bin", os.urandom(MiB + 5))  # overwritten after the approval
    remote.calls.clear()
    fetcher, _ = pinned(remote, stores(), lock)
    async with running(fetcher):
        assert await read_all(fetcher, lock, "m/w.bin") == approved
        await wait_for(lambda: not fetcher.downloads(), "the publication")
    gets = remote.gets()
    assert gets and all(c.version_id == remote.version_ids(BUCKET, "m/w.bin")[0] for c in gets)
    assert remote.count("HEAD") == 0, "what to check against came from the lock"
    local = stores().local_state(lock.objects()[0])
    assert (local.state.value, local.verified) == ("cached", "CRC32")


@trio_test
async def test_the_bytes_are_checked_against_the_lock_not_against_the_bucket(remote: FakeRemote, stores) -> None:
    data = os.urandom(300 * KiB)
    remote.put(BUCKET, "m/w.bin", data, checksum="CRC32")
    made = await lockcmd.make_lock(remote, SOURCES, [])
    # A lock whose checksum is not the bytes' (a lock of other bytes with the same ETag): never published.
    e = next(made.entries())
    wrong = dataclasses.replace(e, check=Expectation("SHA256", "bm90IHRoZSBieXRlcycgU0hBMjU2IGF0IGFsbCEhISE="))
    lock = lockfile.make([lockfile.Folder(BUCKET, P, (wrong,))], [], "test")
    store = stores()
    fetcher, _ = pinned(remote, store, lock)
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(lock.objects()[0])
        dl = handles._open[fh].download
        assert dl is not None
        await dl.finished.wait()  # verified twice (a second download), never published
        assert isinstance(dl.error, IntegrityError) and "SHA256" in str(dl.error)
        handles.release(fh)
    assert store.local_state(lock.objects()[0]).state.value == "missing"
    assert sum(c.end - c.start for c in remote.gets()) == 2 * len(data), "downloaded twice, as any bad bytes are"
    assert remote.count("HEAD") == 1, "the HEAD of lazyfs lock only: nothing asked of the bucket"


@trio_test
async def test_a_lost_version_is_never_served_and_later_opens_fail_at_once(remote: FakeRemote, stores,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    remote.put(BUCKET, "m/w.bin", os.urandom(200 * KiB))  # a bucket without versions
    lock = await lockcmd.make_lock(remote, SOURCES, [])
    new = remote.put(BUCKET, "m/w.bin", os.urandom(200 * KiB))
    store = stores()
    fetcher, pin = pinned(remote, store, lock)
    async with running(fetcher):
        with pytest.raises(PinnedVersionGone) as info:
            await read_all(fetcher, lock, "m/w.bin")
        assert errno_of(info.value) == errno.ESTALE
        locked = next(lock.entries())
        message = str(info.value)
        assert f"ETag {locked.etag}" in message and f"it now holds ETag {new.etag}" in message
        gets = len(remote.gets())
        with pytest.raises(PinnedVersionGone):  # refused at the open: no request
            await Handles(fetcher).open(lock.objects()[0])
        assert len(remote.gets()) == gets
    assert pin.unavailable() == ["m/w.bin"]
    assert store.local_state(lock.objects()[0]).state.value == "missing"
    lines = [r for r in caplog.records if "which the bucket no longer has" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


@trio_test
async def test_an_overwrite_between_two_ranged_gets_fails_the_download_whole(remote: FakeRemote, stores) -> None:
    approved = os.urandom(2 * MiB)
    remote.put(BUCKET, "m/w.bin", approved)
    lock = await lockcmd.make_lock(remote, SOURCES, [])

    def overwrite_before_the_second_get(call: object) -> None:
        if len(remote.gets()) == 2:
            remote.put(BUCKET, "m/w.bin", os.urandom(2 * MiB))

    remote.on_get.append(overwrite_before_the_second_get)
    store = stores()
    fetcher, _ = pinned(remote, store, lock, max_connections=1)
    async with running(fetcher):
        handles = Handles(fetcher)
        fh = await handles.open(lock.objects()[0])
        assert bytes(await handles.read(fh, 0, 4096)) == approved[:4096], "the first part is the locked bytes"
        with pytest.raises(PinnedVersionGone):
            await handles.read(fh, MiB, 4096)
        handles.release(fh)
    assert store.local_state(lock.objects()[0]).state.value in ("missing", "partial")


@trio_test
async def test_a_local_copy_of_the_locked_version_is_served_whatever_the_bucket_holds(remote: FakeRemote,
                                                                                     stores) -> None:
    approved = os.urandom(100 * KiB)
    remote.put(BUCKET, "m/w.bin", approved)
    lock = await lockcmd.make_lock(remote, SOURCES, [])
    store = stores()
    fetcher, pin = pinned(remote, store, lock)
    async with running(fetcher):
        assert await read_all(fetcher, lock, "m/w.bin") == approved
        await wait_for(lambda: not fetcher.downloads(), "the publication")
        remote.delete(BUCKET, "m/w.bin")
        pin.mark_unavailable(next(lock.entries()), "gone")
        remote.calls.clear()
        assert await read_all(fetcher, lock, "m/w.bin") == approved
    assert remote.calls == []


@trio_test
async def test_a_drift_check_reports_and_refuses_only_what_cannot_be_fetched(remote: FakeRemote, stores) -> None:
    remote.keep_versions(BUCKET)
    remote.put(BUCKET, "m/versioned.bin", b"v1" * 1000)
    remote.keep_versions(BUCKET, on=False)  # the rest written while versioning was suspended: no ids
    plain = b"p1" * 1000
    remote.put(BUCKET, "m/plain.bin", plain)
    remote.put(BUCKET, "m/deleted.bin", b"d" * 10)
    lock = await lockcmd.make_lock(remote, SOURCES, [])
    remote.keep_versions(BUCKET)
    remote.put(BUCKET, "m/versioned.bin", b"v2" * 1000)
    remote.keep_versions(BUCKET, on=False)
    remote.put(BUCKET, "m/plain.bin", b"p2" * 1000)
    remote.delete(BUCKET, "m/deleted.bin")
    remote.put(BUCKET, "m/added.bin", b"new")
    remote.put(BUCKET, "m/folder/", b"")  # a console's folder marker: not a file
    fetcher, pin = pinned(remote, stores(), lock)
    watch = DriftWatch(pin, Lister(pin.store, trio.CapacityLimiter(8)), SOURCES, 0)
    remote.calls.clear()
    drift = await watch.check_once()
    assert (drift.changed, drift.deleted, drift.added) == (("m/plain.bin", "m/versioned.bin"), ("m/deleted.bin",),
                                                          ("m/added.bin",))
    assert {c.op for c in remote.calls} <= {"LIST", "HEAD"}, "a drift check fetches nothing"
    assert {(c.key, c.version_id) for c in remote.calls if c.op == "HEAD"} == \
        {("m/plain.bin", "null"), ("m/deleted.bin", "null")}, "it asks only whether version null keeps what is gone"
    assert pin.unavailable() == ["m/deleted.bin", "m/plain.bin"], "the versioned one is fetched by its id"
    async with running(fetcher):
        assert await read_all(fetcher, lock, "m/versioned.bin") == b"v1" * 1000
        with pytest.raises(PinnedVersionGone):
            await Handles(fetcher).open(next(o for o in lock.objects() if o.key == "m/plain.bin"))
        remote.put(BUCKET, "m/plain.bin", plain)  # put back as it was locked
        await watch.check_once()
        assert pin.unavailable() == ["m/deleted.bin"]
        assert await read_all(fetcher, lock, "m/plain.bin") == plain



@trio_test
async def test_a_drift_check_that_keeps_failing_logs_once_then_once_a_minute(
        remote: FakeRemote, stores, caplog: pytest.LogCaptureFixture) -> None:
    remote.put(BUCKET, "m/a.bin", b"a" * 100)
    lock = await lockcmd.make_lock(remote, SOURCES, [])
    _, pin = pinned(remote, stores(), lock)
    now = [0.0]
    watch = DriftWatch(pin, Lister(pin.store, trio.CapacityLimiter(8)), SOURCES, 0,
                       lines=RepeatedLines(clock=lambda: now[0]))

    async def unreachable(source: Source) -> list[object]:
        raise RemoteUnavailable("could not connect to the endpoint", bucket=BUCKET)

    watch.lister.list_folder = unreachable  # type: ignore[method-assign]
    for _ in range(5):  # five checks inside a minute (--refresh 10 against an endpoint that is down)
        assert (await watch.check_once()).error
        now[0] += 10
    now[0] += 20
    await watch.check_once()
    lines = [r.getMessage() for r in caplog.records if "drift check of the lock failed" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "(4 more like it in the last 70 s)" in lines[1]


@trio_test
async def test_a_mount_of_the_old_lock_and_a_bake_of_the_new_share_the_store_and_its_downloads(
        remote: FakeRemote, stores) -> None:
    """Pre-staging: a bake of the new lock next to a pinned mount of the old
    one, on one store.  A version both locks pin, which the mount is fetching
    right now, is not fetched twice: the bake follows the mount's download
    (the store's download lock), and the bytes only the new lock has are
    fetched by the bake, while the mount goes on serving the old lock."""
    remote.keep_versions(BUCKET)
    shared = os.urandom(2 * MiB)
    remote.put(BUCKET, "m/shard-1.bin", shared)
    remote.put(BUCKET, "m/shard-2.bin", b"old" * 1000)
    old = await lockcmd.make_lock(remote, SOURCES, [])
    remote.put(BUCKET, "m/shard-2.bin", b"new" * 1000)
    new = await lockcmd.make_lock(remote, SOURCES, [])
    gate = remote.gate("m/shard-1.bin", start=MiB)  # the mount's download stops half-way
    mount, _ = pinned(remote, stores(), old)
    bake, _ = pinned(remote, stores(), new, origin="bake")
    async with running(mount), running(bake):
        handles = Handles(mount)
        fh = await handles.open(next(o for o in old.objects() if o.key == "m/shard-1.bin"))
        assert bytes(await handles.read(fh, 0, 4096)) == shared[:4096]
        async with trio.open_nursery() as nursery:
            baked: list[Progress] = []

            async def bake_all() -> None:
                baked.append(await Prefetcher(bake).run(new.objects()))

            nursery.start_soon(bake_all)
            await wait_for(lambda: bake._foreign, "the bake to follow the mount's download")
            assert bytes(await handles.read(fh, 0, 4096)) == shared[:4096], "the mount serves all along"
            gate.release()
        progress = baked[0]
        assert not progress.failed and progress.done_files == 2, progress
        handles.release(fh)
    fetched = {}
    for c in remote.gets():
        fetched[c.key] = fetched.get(c.key, 0) + c.end - c.start
    assert fetched == {"m/shard-1.bin": 2 * MiB, "m/shard-2.bin": 3000}, "each version fetched once"
    store = stores()
    assert all(store.local_state(o).state.value == "cached" for o in new.objects())


@trio_test
async def test_the_lock_summary_tells_files_written_before_versioning_from_a_bucket_without_versions(
        remote: FakeRemote, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects written before versioning was turned on have no version id
    (S3's "null"), as in a bucket that keeps none; but there an overwrite
    keeps them as an older version.  Before, `lazyfs lock` said "the bucket
    keeps no versions" of both; now it asks the bucket (GetBucketVersioning)
    and says which, and where the bucket will not say, what it said before."""
    remote.put(BUCKET, "m/w.bin", os.urandom(64 * KiB))
    making = lockcmd.Making()
    lock = await lockcmd.make_lock(remote, SOURCES, [], making)
    assert making.versioning == {BUCKET: ""}
    assert "pinned by ETag (the bucket keeps no versions: " in lockcmd.summary(lock, None, making)

    remote.keep_versions(BUCKET)  # turned on after the put: the object stays version "null"
    making = lockcmd.Making()
    lock = await lockcmd.make_lock(remote, SOURCES, [], making)
    assert not next(lock.entries()).version_id
    line = lockcmd.summary(lock, None, making)
    assert "keeps no versions" not in line
    assert "pinned by ETag (version null, written before versioning was on or while it was suspended: " in line
    remote.put(BUCKET, "m/new.bin", os.urandom(KiB))  # with a version id: the two kinds side by side
    making = lockcmd.Making()
    lock = await lockcmd.make_lock(remote, SOURCES, [], making)
    assert "1 by version id, 1 by ETag alone (version null, written before versioning was on" in \
        lockcmd.summary(lock, None, making)

    monkeypatch.setattr(remote, "versioning", lambda bucket: None)  # AccessDenied: the wording of before
    making = lockcmd.Making()
    lock = await lockcmd.make_lock(remote, SOURCES, [], making)
    assert "1 by version id, 1 by ETag alone (written before versioning was on)" in \
        lockcmd.summary(lock, None, making)
    remote.put(BUCKET, "m/w.bin", os.urandom(64 * KiB))
    making = lockcmd.Making()
    lock = await lockcmd.make_lock(remote, SOURCES, [], making)
    assert "each pinned by its version id" in lockcmd.summary(lock, None, making)
    assert making.versioning == {}, "asked with every file pinned by its version id"


@trio_test
async def test_an_object_changing_while_the_lock_is_made_is_a_warning_and_counted(
        remote: FakeRemote, caplog: pytest.LogCaptureFixture) -> None:
    """The listing finds one version and the HEAD another: the lock pins the
    version found last, which may not be the one tested and approved.
    Before, one INFO line said so; now a WARNING, and the summary counts it."""
    remote.keep_versions(BUCKET)
    remote.put(BUCKET, "m/a.bin", os.urandom(KiB))
    remote.put(BUCKET, "m/r.bin", os.urandom(KiB))
    head = remote.head

    def overwritten_before_its_head(bucket: str, key: str, etag: str | None = None) -> object:
        if key == "m/r.bin" and len(remote.version_ids(bucket, key)) == 1:
            remote.put(bucket, key, os.urandom(KiB))
        return head(bucket, key, etag)

    remote.head = overwritten_before_its_head  # type: ignore[method-assign]
    making = lockcmd.Making()
    lock = await lockcmd.make_lock(remote, SOURCES, [], making)
    assert making.changed == ["m/r.bin"]
    assert {e.key: e.version_id for e in lock.entries()}["m/r.bin"] == remote.version_ids(BUCKET, "m/r.bin")[-1]
    warned = [r for r in caplog.records if "changed while the lock was being made" in r.getMessage()]
    assert [r.levelname for r in warned] == ["WARNING"]
    line = lockcmd.summary(lock, None, making)
    assert "; 1 file changed while the lock was being made: its last version is locked, maybe not the one " \
           "approved" in line


@trio_test
async def test_a_file_locked_before_versioning_was_on_is_not_said_to_be_gone_from_the_bucket(
        remote: FakeRemote, stores) -> None:
    """Locked by ETag (version "null", written before versioning was turned
    on), then overwritten: S3 keeps the locked bytes as version null, which
    the pinned mount fetches (test_pinned_null.py); here version null is
    deleted too.  Before, its ESTALE line said "which the bucket no longer
    has"; now it says what is true."""
    remote.put(BUCKET, "m/w.bin", os.urandom(200 * KiB))
    remote.keep_versions(BUCKET)
    lock = await lockcmd.make_lock(remote, SOURCES, [])
    new = remote.put(BUCKET, "m/w.bin", os.urandom(200 * KiB))
    remote.delete_version(BUCKET, "m/w.bin", "null")
    fetcher, _ = pinned(remote, stores(), lock)
    async with running(fetcher):
        with pytest.raises(PinnedVersionGone) as info:
            await read_all(fetcher, lock, "m/w.bin")
    message = str(info.value)
    assert errno_of(info.value) == errno.ESTALE
    assert "which the bucket no longer has" not in message
    assert "which is no longer the object at that key, and which the bucket does not serve as version null" \
        in message
    assert f"it now holds ETag {new.etag}, {new.size} bytes, version {remote.version_ids(BUCKET, 'm/w.bin')[-1]}" \
        in message
