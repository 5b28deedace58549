"""End to end (issue 11, listings and readiness): a failing first listing,
the saved listing meanwhile, a truthful ready line, one throttled LIST among
many, and what a listing costs in LIST requests, counted at the proxy."""

from __future__ import annotations

import concurrent.futures
import errno
import signal
import time
from pathlib import Path

import pytest

from support.mounting import FS, wait_until
from support.mountproc import is_mounted
from support.proxy import Fault

pytestmark = pytest.mark.fuse

P = "models/m"
# More than the start-up check's page (100 keys): it does not list the folder
# whole, so the first listing is a request of its own that can fail.
FILL = [f"{P}/fill/{i:03d}" for i in range(100)]
# Every LIST but the start-up probe (the first one) fails.
LISTS_FAIL_503 = Fault("status", method="GET", query={"list-type": "2"}, status=503, code="SlowDown",
                       skip=1, times=None)
LISTS_FAIL_403 = Fault("status", method="GET", query={"list-type": "2"}, status=403, code="AccessDenied",
                       skip=1, times=None)


def put_many(s3, bucket: str, keys: list[str]) -> None:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))


@pytest.mark.log_errors("listing failed", r"^\S+ \S+ ERROR lazyfs.fuse_ops: (lookup|opendir): ")
def test_a_failing_first_listing_is_retried_and_never_makes_a_file_look_missing(mount, proxy, s3, bucket,
                                                                                 fs: FS):
    """Before: the failed listing left an empty mount, every name ENOENT (the
    kernel caches that), and with --refresh 0 it stayed so forever."""
    put_many(s3, bucket, [f"{P}/a.bin", f"{P}/sub/b.bin", *FILL])
    proxy.add(LISTS_FAIL_503)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", "--retries", "0")
    # Truthful either way: the first attempt may still be retrying its requests.
    line = m.ready_line()
    assert "LISTING FAILED" in line or "still listing" in line, line
    wait_until(lambda: "listing failed" in m.log(), what="the first listing to fail")
    for _ in range(2):  # not a cached negative entry: asked again, failing again
        assert fs.stat_errno(m.file(f"{P}/a.bin")) == errno.EIO
    assert proxy.count("LIST") > 2
    proxy.clear_faults()  # the store recovers: the listing is tried again within seconds
    # A lookup lists its own name at once; the listing follows at its next try.
    wait_until(lambda: fs.stat_errno(m.file(f"{P}/a.bin")) == 0, timeout=30, what="the lookup")
    wait_until(lambda: "listed 102 objects" in m.log(), timeout=30, what="the retried listing")
    assert fs.listdir(m.path / P) == ["a.bin", "fill", "sub"]
    assert fs.read(m.file(f"{P}/sub/b.bin")) == f"{P}/sub/b.bin".encode()


@pytest.mark.log_errors("listing failed", r"^\S+ \S+ ERROR lazyfs.fuse_ops: lookup: ")
def test_the_ready_line_says_when_the_listing_failed(mount, proxy, s3, bucket, fs: FS):
    put_many(s3, bucket, [f"{P}/a.bin", *FILL])
    proxy.add(LISTS_FAIL_403)  # not retried within the listing: fails at once
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0")
    line = m.ready_line()
    assert line.startswith("lazyfs: ready LISTING FAILED: ") and "retried" in line and "AccessDenied" in line
    assert fs.stat_errno(m.file(f"{P}/a.bin")) == errno.EACCES  # asked, not assumed missing
    proxy.clear_faults()
    wait_until(lambda: fs.stat_errno(m.file(f"{P}/a.bin")) == 0, timeout=30, what="the retried listing")


@pytest.mark.log_errors("listing failed", r"^\S+ \S+ ERROR lazyfs.fuse_ops: lookup: ")
def test_a_failing_first_listing_serves_the_saved_listing_meanwhile(mount, proxy, s3, bucket, fs: FS,
                                                                      tmp_path: Path):
    store = tmp_path / "store"
    put_many(s3, bucket, [f"{P}/a.bin", f"{P}/sub/b.bin", *FILL])
    first = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(first.file(f"{P}/a.bin")) == f"{P}/a.bin".encode()
    first.stop()
    put_many(s3, bucket, [f"{P}/new.bin"])  # not in the saved listing
    proxy.add(LISTS_FAIL_403)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", store=store)
    line = m.ready_line()
    assert line.startswith("lazyfs: ready SAVED LISTING: ") and "102 files" in line, line
    assert fs.listdir(m.path / P) == ["a.bin", "fill", "sub"]
    assert fs.read(m.file(f"{P}/sub/b.bin")) == f"{P}/sub/b.bin".encode(), "fetched: S3 is reachable"
    # A name the saved listing lacks is asked for, and that fails: not "missing".
    assert fs.stat_errno(m.file(f"{P}/new.bin")) == errno.EACCES
    proxy.clear_faults()
    wait_until(lambda: "replaces the saved one" in m.log(), timeout=30, what="the live listing")
    assert fs.listdir(m.path / P) == ["a.bin", "fill", "new.bin", "sub"]
    assert fs.read(m.file(f"{P}/new.bin")) == f"{P}/new.bin".encode()


def test_a_listing_of_hundreds_of_folders_costs_a_few_lists_and_survives_one_throttled(mount, proxy, s3,
                                                                                       bucket, fs: FS):
    """400 folders of 3 files: before, one LIST per folder (401), and one of
    them failing (after botocore's retries) failed the whole listing."""
    keys = [f"{P}/d{i:03d}/f{j}.bin" for i in range(400) for j in range(3)]
    put_many(s3, bucket, keys)
    # The listing's first request (alone in flight then) fails twice: every
    # attempt botocore makes with --retries 0 (it makes two: it counts
    # max_attempts as retries), so the request fails as a whole.
    proxy.add(Fault("status", method="GET", query={"list-type": "2"}, status=503, code="SlowDown", skip=1,
                    times=2))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", "--retries", "0")
    wait_until(lambda: "listed 1200 objects" in m.log() or "listing failed" in m.log(), timeout=30,
               what="the first listing")
    assert "listing failed" not in m.log() and "trying that listing request again" in m.log()
    lists = proxy.count("LIST")
    assert [r["fault"] for r in proxy.requests("LIST")].count("status") == 2
    # The probe, two failed attempts, the first page, one look at the folders
    # (400 of them: a page is left, so no split), the second page.
    assert lists <= 8, f"the first listing cost {lists} LISTs"
    assert len(fs.listdir(m.path / P)) == 400
    m.process.send(signal.SIGHUP)  # a refresh splits where the last listing did: 2 pages, 2 LISTs
    wait_until(lambda: proxy.count("LIST") >= lists + 2, what="the refresh")
    time.sleep(1)
    assert proxy.count("LIST") == lists + 2


def test_an_open_as_soon_as_the_mount_appears_goes_before_the_listing_of_a_big_folder(mount, proxy, s3, bucket,
                                                                                      fs: FS, tmp_path: Path):
    """Issue 13 (peer-bench's S4: a model beside thousands of small app files,
    opened the moment the mount shows in /proc/mounts): the first 4 KiB of
    the model within two requests of the open, its folder's LIST and the
    GET, with the rest of the listing after them (quiet.py).  Before, the
    full listing's pages went out at once, and the open waited behind them
    on a store that serves one request at a time (294 ms there, 8 requests)."""
    weights = bytes(range(256)) * 4096
    put_many(s3, bucket, [f"{P}/app/{i:03d}.json" for i in range(300)])
    s3.put_object(Bucket=bucket, Key=f"{P}/model/weights.bin", Body=weights)
    mnt = tmp_path / "early"
    mnt.mkdir()

    def open_when_mounted() -> bytes:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert time.monotonic() < deadline, "never mounted"
            time.sleep(0.005)
        with open(mnt / P / "model" / "weights.bin", "rb") as f:
            return f.read(4096)

    first = fs.start(open_when_mounted)
    mount("--prefix", f"s3://{bucket}/{P}", mountpoint=mnt)
    assert first.result(timeout=20) == weights[:4096]
    requests = proxy.requests()
    assert requests[0]["kind"] == "LIST" and requests[0]["query"].get("max-keys") == "100", "the start-up probe"
    first_get = next(i for i, r in enumerate(requests) if r["kind"] == "GET")
    assert [(r["kind"], r["query"].get("prefix")) for r in requests[1:first_get]] == [("LIST", f"{P}/model")], \
        "the open's lookup lists its own folder, and nothing else goes before the GET"
    wait_until(lambda: any(r["kind"] == "LIST" and r["query"].get("prefix") == f"{P}/"
                           for r in proxy.requests()[1:]), what="the folder's full listing, later")


def test_a_folder_with_no_objects_and_a_marker_with_a_body_are_each_warned_of(mount, s3, bucket, fs: FS):
    """A mount of a folder that does not exist (a typo) started empty with no
    word, and a folder marker with a body was dropped silently while every
    other key not shown gets a warning.  Each gets one warning line; the
    mount starts all the same, and shows what appears later."""
    s3.put_object(Bucket=bucket, Key=f"{P}/marker/", Body=b"a marker with a body")
    s3.put_object(Bucket=bucket, Key=f"{P}/marker/x.bin", Body=b"x")
    m = mount("--prefix", f"s3://{bucket}/{P}", "--prefix", f"s3://{bucket}/modls/typo", "--refresh", "1")
    assert fs.listdir(m.path / "modls" / "typo") == []
    assert fs.read(m.file(f"{P}/marker/x.bin")) == b"x"
    warnings = [ln for ln in m.log().splitlines() if " WARNING " in ln]
    assert sum(f'"s3://{bucket}/modls/typo/" holds no objects' in ln for ln in warnings) == 1, warnings
    assert sum(f'skipping object "{P}/marker/": is a folder marker with a body' in ln for ln in warnings) == 1
    assert not any(f"s3://{bucket}/{P}/\" holds no" in ln for ln in warnings)
    s3.put_object(Bucket=bucket, Key="modls/typo/late.bin", Body=b"late")
    wait_until(lambda: fs.listdir(m.path / "modls" / "typo") == ["late.bin"], timeout=30, what="the next listing")


@pytest.mark.log_errors("listing failed")
def test_refreshes_that_keep_failing_log_one_line_then_one_when_they_succeed(mount, proxy, s3, bucket):
    """Each failed refresh logged three lines (two WARNINGs for the retries
    of its listing request, one ERROR), at every refresh for as long as the
    endpoint failed.  Now the failure once (at most one more a minute), and
    one line when a listing succeeds again."""
    put_many(s3, bucket, [f"{P}/a.bin"])
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "1", "--retries", "0")
    wait_until(lambda: "listed 1 object" in m.log(), what="the first listing")
    proxy.add(Fault("status", method="GET", query={"list-type": "2"}, status=503, code="SlowDown", times=None))
    # Four failed refreshes of three requests each.
    wait_until(lambda: proxy.count("LIST") >= 1 + 4 * 3, timeout=60, what="four failed refreshes")
    lines = [ln for ln in m.log().splitlines() if " DEBUG " not in ln]
    failed = [ln for ln in lines if "listing failed" in ln]
    assert len(failed) == 1, "\n".join(failed)
    assert not [ln for ln in lines if "WARNING" in ln], "\n".join(lines)
    proxy.clear_faults()
    wait_until(lambda: "listing succeeded again after" in m.log(), timeout=30, what="the recovery line")
    assert len([ln for ln in m.log().splitlines() if "listing failed" in ln and " DEBUG " not in ln]) == 1
