"""End to end: `--retries N` is N retries, so N + 1 attempts, of a request
that keeps failing before a response, on both transfer clients; each retry
is logged as README says."""

from __future__ import annotations

import collections
import errno
import os
from pathlib import Path

import pytest

from support.mounting import FS, on_both_clients
from support.proxy import Fault

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/m"


@pytest.mark.log_errors('download of .* failed: ', r"read: .*kept failing")
@pytest.mark.parametrize("retries", [0, 2])
def test_retries_n_is_n_plus_one_attempts_of_a_failing_range(mount, proxy, s3, bucket, fs: FS, tmp_path: Path,
                                                             retries: int):
    """A 503 on every GET: N + 1 attempts of the range (boto3 made N + 2:
    botocore's N + 1, then one more; the CRT 2 with --retries 0)."""
    key = f"{P}/mid.bin"
    s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(50_000))  # one part: one range
    proxy.add(Fault("status", key=key, status=503, code="SlowDown", times=None))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--retries", str(retries),
              "--read-deadline", "30", store=tmp_path / "store")
    with pytest.raises(OSError) as info:
        fs.read(m.file(key), timeout=60)
    assert info.value.errno == errno.EIO
    tries = collections.Counter(r["range"] for r in proxy.requests("GET", key))
    assert list(tries.values()) == [retries + 1], f"--retries {retries}: {tries}"
    retried = [ln for ln in m.log().splitlines() if "retrying" in ln and key in ln]
    assert len(retried) == retries, f"--retries {retries}: one line per retry, logged:\n" + "\n".join(retried)
    # A second open starts a download that fails the same way: its retries are
    # not said again (a loader retrying in a loop logged 4 lines per open).
    with pytest.raises(OSError) as info:
        fs.read(m.file(key), timeout=60)
    assert info.value.errno == errno.EIO
    assert sum(collections.Counter(r["range"] for r in proxy.requests("GET", key)).values()) == 2 * (retries + 1)
    again = [ln for ln in m.log().splitlines() if "retrying" in ln and key in ln]
    assert again == retried, "the same retries of the same file were logged again"
