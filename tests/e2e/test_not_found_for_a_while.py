"""End to end, on both transfer clients: a listed object the object store
answers `404 NoSuchKey` for a while (SeaweedFS for about 30 s after a link
flap, for objects its listing still names), through the fault proxy.  Its
name goes at the 404, and comes back without waiting for the next listing,
within the back-off (asked again 2 s after, then 4 s later...); an object
really deleted stays gone."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, on_both_clients, wait_until
from support.proxy import Fault

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/m"
FLAKY, GONE, OTHER = f"{P}/flaky.safetensors", f"{P}/gone.safetensors", f"{P}/config.json"
NOT_FOUND_S = 4.0  # how long the store answers 404 for FLAKY (its reads and HEAD well within it)


def test_an_object_not_found_for_a_while_comes_back_and_a_deleted_one_stays_gone(mount, proxy, s3, bucket,
                                                                                  fs: FS, tmp_path: Path):
    """Before: both names went until the next listing (an hour here; with
    SeaweedFS, whose listing names the object all along, until something else
    in the folder changed), and a model server opening the file got ENOENT."""
    flaky = os.urandom(300_000)
    for key, body in ((FLAKY, flaky), (GONE, os.urandom(1000)), (OTHER, b"{}")):
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "3600", "--retries", "2", store=tmp_path / "store")
    assert fs.listdir(m.path / P) == ["config.json", "flaky.safetensors", "gone.safetensors"]
    lists = proxy.count("LIST")
    proxy.add(Fault("status", method=None, key=FLAKY, status=404, code="NoSuchKey", times=None,
                    lasts=NOT_FOUND_S))  # GETs and HEADs; the listing still names it
    s3.delete_object(Bucket=bucket, Key=GONE)
    for key in (FLAKY, GONE):
        with pytest.raises(FileNotFoundError):
            fs.read(m.file(key))
    assert fs.listdir(m.path / P) == ["config.json"], "each name goes at its 404"
    assert proxy.count("GET", FLAKY) >= 1 and proxy.count("HEAD", FLAKY) >= 1, "the fault never fired"

    wait_until(lambda: "flaky.safetensors" in fs.listdir(m.path / P), timeout=20,
               what="the name back once the store finds it again (asked again after 2 s, then 4 s later)")
    assert fs.read(m.file(FLAKY), timeout=30) == flaky
    assert proxy.count("LIST") == lists, "no listing brought it back"
    assert "found again in the object store" in m.log()
    heads = proxy.count("HEAD", FLAKY)
    assert 2 <= heads <= 4, f"{heads} HEADs of it: one confirming the 404, a re-check or two"

    assert fs.stat_errno(m.file(GONE)) == errno.ENOENT, "a deleted object stays gone"
    assert fs.listdir(m.path / P) == ["config.json", "flaky.safetensors"]
    assert fs.read(m.file(OTHER)) == b"{}"
    assert proxy.count("HEAD", OTHER) == 0 and proxy.count("HEAD", FLAKY) == heads, "no HEAD but after a 404"
    assert "Traceback" not in m.log()


def test_a_name_asked_about_again_is_missing_for_status_require_all(mount, proxy, s3, bucket, fs: FS,
                                                                    tmp_path: Path):
    """Before: while a name a 404 took was asked about again, `lazyfs status
    --require-all` did not know of it (it is out of the tree), called the mount
    ready with every other file on disk, and a readiness probe let traffic in
    to a model missing a shard."""
    flaky = os.urandom(300_000)
    for key, body in ((FLAKY, flaky), (OTHER, b"{}")):
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "3600", "--retries", "0", store=tmp_path / "store")
    assert fs.read(m.file(OTHER)) == b"{}"
    proxy.add(Fault("status", method=None, key=FLAKY, status=404, code="NoSuchKey", times=None, lasts=600))
    with pytest.raises(FileNotFoundError):
        fs.read(m.file(FLAKY))
    assert fs.listdir(m.path / P) == ["config.json"]
    status = lazyfs_cli(["status", "--require-all", str(m.path)])
    assert status.returncode == 1, status.stdout + status.stderr
    rows = [ln.split() for ln in status.stdout.splitlines()]
    assert ["missing", f"{len(flaky):,}", FLAKY] in rows, status.stdout
    assert ["cached", "2", OTHER] in rows, status.stdout
    assert "1 missing" in status.stdout and "not ready" in status.stdout, status.stdout
