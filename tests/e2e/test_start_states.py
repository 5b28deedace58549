"""End to end: what a start serves when the object store is not answering as
usual.  An endpoint that answers, even with 5xx or SlowDown to every LIST,
is reachable: the mount comes up (LISTING FAILED, or SAVED LISTING) and
retries the listing; only one nothing answers is an offline start.  And an
offline start serves what the last saved listing names, not a copy of an
object deleted before it was saved."""

from __future__ import annotations

import errno
import signal
import time
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, wait_until
from support.proxy import Fault
from support.s3server import free_port

pytestmark = pytest.mark.fuse

P = "models/m"


def every_list_answered(status: int, code: str) -> Fault:
    return Fault("status", method="GET", query={"list-type": "2"}, status=status, code=code, times=None)


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: every connection refused


def saved_listing(store: Path) -> None:
    wait_until(lambda: any((store / ".lazyfs" / "listings").glob("*.json")), what="the saved listing")


@pytest.mark.log_errors("listing failed", r"^\S+ \S+ ERROR lazyfs.fuse_ops: lookup: ")
@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests")])
def test_a_first_listing_answered_with_errors_mounts_and_retries(mount, proxy, s3, bucket, fs: FS,
                                                                 tmp_path: Path, status: int, code: str):
    """Before: exit 1 ("kept failing ..., and the store has nothing to serve") within a second, as if
    nothing had answered: a burst of throttling at a fleet's scale-up made sidecars crash-loop."""
    key = f"{P}/a.bin"
    s3.put_object(Bucket=bucket, Key=key, Body=b"a" * 1000)
    proxy.add(every_list_answered(status, code))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", store=tmp_path / "store")
    line = m.ready_line()
    assert line.startswith("lazyfs: ready LISTING FAILED: ") and code in line, line
    assert fs.stat_errno(m.file(key)) == errno.EIO  # asked (and failing), not assumed missing
    proxy.clear_faults()  # the throttling ends: the listing is tried again within seconds
    wait_until(lambda: "listed 1 object" in m.log(), timeout=30, what="the retried listing")
    assert fs.listdir(m.path / P) == ["a.bin"]
    assert fs.read(m.file(key)) == b"a" * 1000
    assert m.process.proc is not None and m.process.proc.poll() is None


@pytest.mark.log_errors("listing failed")
def test_a_first_listing_answered_with_errors_serves_the_saved_listing_and_fetches(mount, proxy, s3, bucket,
                                                                                 fs: FS, tmp_path: Path):
    """Before: ready OFFLINE, and a file the saved listing names but not on disk failed with EIO at once,
    although the object store served GETs."""
    cached, fetched = f"{P}/cached.bin", f"{P}/fetched.bin"
    for k in (cached, fetched):
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode() * 100)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m.file(cached)) == cached.encode() * 100
    wait_until((store / cached).exists, what="publication")
    saved_listing(store)
    m.stop()
    proxy.add(every_list_answered(500, "InternalError"))
    m2 = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", store=store)
    line = m2.ready_line()
    assert line.startswith("lazyfs: ready SAVED LISTING: ") and "2 files" in line, line
    gets = proxy.count("GET")
    assert fs.read(m2.file(fetched)) == fetched.encode() * 100, "fetched: the object store answers GETs"
    assert proxy.count("GET") > gets
    # Every file on disk, but what S3 holds now is unknown: not ready (it said "ready", exit 0).
    probe = lazyfs_cli(["status", str(m2.path), "--require-all"])
    assert probe.returncode == 1 and "the mount serves the store's saved listing" in probe.stdout, probe.stdout
    proxy.clear_faults()
    wait_until(lambda: "replaces the saved one" in m2.log(), timeout=30, what="the live listing")
    probe = lazyfs_cli(["status", str(m2.path), "--require-all"])
    assert probe.returncode == 0, probe.stdout


@pytest.mark.log_errors("listing failed")  # (an offline mount's tries to get its listing back)
def test_an_offline_start_does_not_bring_back_a_file_deleted_from_the_object_store(mount, s3, bucket, fs: FS,
                                                                                  tmp_path: Path):
    """Before: the store still held the deleted file's bytes, and an offline start listed it, served them
    and called it cached, although the saved listing (refreshed after the delete) no longer named it."""
    keep, gone = f"{P}/keep.txt", f"{P}/gone.txt"
    for k in (keep, gone):
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", store=store)
    for k in (keep, gone):
        assert fs.read(m.file(k)) == k.encode()
        wait_until((store / k).exists, what="publication")
    s3.delete_object(Bucket=bucket, Key=gone)
    m.process.send(signal.SIGHUP)
    wait_until(lambda: "listing changed: 0 added, 1 removed" in m.log(), what="the refresh")
    assert fs.listdir(m.path / P) == ["keep.txt"]
    m.stop()
    assert (store / gone).exists(), "the store keeps the bytes: the test would prove nothing"
    down = dead_endpoint()
    m2 = mount("--prefix", f"s3://{bucket}/{P}", endpoint=down, store=store)
    assert m2.ready_line().startswith("lazyfs: ready OFFLINE: ")
    assert fs.listdir(m2.path / P) == ["keep.txt"]
    assert fs.stat_errno(m2.file(gone)) == errno.ENOENT
    assert ("starting offline with the 1 file the store knows, 1 of them on disk; the others fail with EIO until "
            "the object store is reachable again; 1 file on disk that the saved listing no longer names (deleted "
            "from the object store) not served") in m2.log(), m2.log()
    assert fs.read(m2.file(keep)) == keep.encode()
    # `lazyfs status` with the object store unreachable reads the same saved listing.
    res = lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--store", str(store), "--endpoint-url", down])
    assert res.returncode == 0, res.stderr
    assert "keep.txt" in res.stdout and "gone.txt" not in res.stdout, res.stdout


@pytest.mark.log_errors("listing failed")
def test_a_copy_newer_than_the_saved_listing_is_served_offline(mount, s3, bucket, fs: FS, tmp_path: Path):
    """A file on disk the saved listing does not name is a deleted object's copy only if it is older than
    the listing: an object uploaded since, whose copy an image put in a prebaked layer, is served."""
    old, new = f"{P}/old.bin", f"{P}/new.bin"
    s3.put_object(Bucket=bucket, Key=old, Body=b"old")
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m.file(old)) == b"old"
    wait_until((store / old).exists, what="publication")
    saved_listing(store)
    m.stop()
    time.sleep(1.1)  # dates count whole seconds (S3's Last-Modified, image layers' mtimes)
    layer = tmp_path / "layer"
    (layer / P).mkdir(parents=True)
    (layer / new).write_bytes(b"new")  # copied in after the listing was saved
    m2 = mount("--prefix", f"s3://{bucket}/{P}", "--prebaked", str(layer), endpoint=dead_endpoint(),
               store=store)
    assert m2.ready_line().startswith("lazyfs: ready OFFLINE: ")
    assert "starting offline with the 2 files the store knows, 2 of them on disk;" in m2.log(), m2.log()
    assert fs.listdir(m2.path / P) == ["new.bin", "old.bin"]
    assert fs.read(m2.file(new)) == b"new"


@pytest.mark.log_errors("listing failed")
def test_a_name_the_saved_listing_lacks_is_looked_up_and_reads(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """SAVED LISTING: a name the saved listing lacks is looked up in S3.  Before: `stat` of an object uploaded
    since the listing was saved worked (the lookup listed it), but `open` failed with ESTALE: the open checked
    only the saved listing, and told the kernel the name it had just looked up was stale."""
    old, new = f"{P}/old.bin", f"{P}/new.bin"
    s3.put_object(Bucket=bucket, Key=old, Body=b"old")
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m.file(old)) == b"old"
    saved_listing(store)
    m.stop()
    s3.put_object(Bucket=bucket, Key=new, Body=b"new" * 100)
    # The folder's whole listing fails; a lookup's listing of one name (its own prefix) is answered.
    proxy.add(Fault("status", method="GET", query={"list-type": "2", "prefix": f"{P}/"}, status=500,
                    code="InternalError", times=None))
    m2 = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", store=store)
    assert m2.ready_line().startswith("lazyfs: ready SAVED LISTING: ")
    assert fs.stat(m2.file(new)).st_size == 300
    assert fs.read(m2.file(new)) == b"new" * 100
    assert fs.read(m2.file(old)) == b"old"
    assert "listed 2 objects" not in m2.log(), "the full listing succeeded: the test would prove nothing"
