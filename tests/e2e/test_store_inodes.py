"""End to end: a store whose filesystem runs out of inodes, with bytes to spare.

A tester's store on an ext4 made with `mkfs.ext4 -N 64` (304 inodes, 271 MiB
free): readers rightly got ENOSPC, but the log said only "No space left on
device", `lazyfs doctor` said "0.3 GiB free" and never looked at inodes, and
`stats.json` had no inode count.  Here a tmpfs with few inodes stands in for
it (nr_inodes: no loop device needed)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Iterator

import pytest
from test_observability import scrape

from support.filesystems import mounted_tmpfs
from support.mounting import FS, lazyfs_cli, wait_until
from support.s3server import free_port

pytestmark = pytest.mark.fuse

P = "models/m"
INODES = 40


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 2 GiB (a limit, not memory taken) but INODES inodes
    (mounting one needs CAP_SYS_ADMIN, as FUSE does)."""
    with mounted_tmpfs(tmp_path / "few-inodes", f"size=2g,nr_inodes={INODES},mode=0755", "this test") as path:
        yield path


@pytest.mark.log_errors("No space left on device: the store's filesystem has no free inodes")
def test_a_store_out_of_inodes_says_so_in_the_log_doctor_and_stats(few_inodes: Path, mount, proxy, s3, bucket,
                                                                    fs: FS) -> None:
    keys = [f"{P}/f{i:02d}.bin" for i in range(INODES)]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode() * 100)
    store = few_inodes / "store"
    port = free_port()
    m = mount("--prefix", f"s3://{bucket}/{P}", "--metrics-port", str(port), store=store)
    failed = []
    for key in keys:  # each file kept takes an inode, each download in progress a few more
        try:
            assert fs.read(m.file(key)) == key.encode() * 100
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            failed.append(key)
    assert failed, f"{INODES} inodes held every file: the test proves nothing"
    log = m.log()
    nospace = [line for line in log.splitlines() if "No space left on device" in line and " DEBUG " not in line]
    assert nospace and all(f"the store's filesystem has no free inodes ({INODES} in all; " in line
                               and "MiB free)" in line for line in nospace), "\n".join(nospace)

    def fresh_stats() -> dict[str, int] | None:  # (a statvfs answer is served again for a second: storespace.py)
        shown: dict[str, int] = json.loads(fs.read(m.path / ".lazyfs" / "stats.json"))["store_filesystem"]
        return shown if shown["free_inodes"] == os.statvfs(store).f_favail else None

    shown = wait_until(fresh_stats, what="stats.json with the store's inodes now")
    assert shown["inodes"] == INODES and shown["free_inodes"] < INODES // 4, shown
    assert shown["free_bytes"] > 1 << 30  # the bytes were never the problem
    metrics = scrape(port)
    assert metrics["lazyfs_store_inodes"] == INODES and metrics["lazyfs_store_free_inodes"] < INODES // 4, metrics
    res = lazyfs_cli(["doctor", "--store", str(store), "--prefix", f"s3://{bucket}/{P}",
                      "--endpoint-url", proxy.endpoint])
    [line] = [x for x in res.stdout.splitlines() if x.startswith(("ok    store:", "warn  store:", "FAIL  store:"))]
    assert line.startswith("warn  store:") and f"of {INODES} inodes free" in line, line
    assert "free some inodes" in line and "free some space" not in line, line
    assert m.stop() == 0
