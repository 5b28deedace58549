"""End to end: `--retries N` is N retries of each request, also when many
requests fail at once (an outage while a file's parallel GETs are in
flight).

botocore's standard retry mode shares one retry quota among a client's
requests (500, 14 a retry after no response; only successes give some
back): 16 parallel GETs spent it within seconds of an outage, and then no
request was retried at all.  A tester's 1 GiB read with `--retries 10`
failed 31 s into the outage at `attempt 4 of 11`, as with `--retries 4`."""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import pytest

from support.mounting import FS, on_both_clients
from support.proxy import Fault

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/m"
PART = 64 * 1024
RANGES = 16  # the file's parts: the first, then 15 side by side (the 16th connection is a reader's)
DROPS = 60  # about 4 failed attempts of each of the 15: 60 retries, 840 of the old quota's 500
RETRIES = 10


def test_an_outage_shorter_than_the_retries_does_not_fail_parallel_requests(mount, proxy, s3, bucket, fs: FS,
                                                                           tmp_path: Path, transfer_client: str):
    """The server unreachable (connections reset before any answer) for the
    file's 15 parallel GETs' first 60 attempts, about 4 each: with
    `--retries 10`, every request gets through and the read succeeds."""
    key = f"{P}/w.bin"
    data = os.urandom(RANGES * PART)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--retries", str(RETRIES),
              store=tmp_path / "store")
    fs.listdir(m.path / P)
    # The first part goes through (the sweep opens up once its bytes arrive); the rest meet the outage.
    proxy.add(Fault("drop", key=key, min_offset=PART, times=DROPS))
    assert fs.read(m.file(key), timeout=120) == data
    gets = proxy.requests("GET", key)
    assert sum(r["fault"] == "drop" for r in gets) == DROPS, "the outage did not happen"
    tries = collections.Counter(r["range"] for r in gets)
    assert len(tries) == RANGES and max(tries.values()) <= RETRIES + 1, tries
    assert not re.search(r" (WARNING|ERROR) ", m.log()), [ln for ln in m.log().splitlines() if " WARNING " in ln]
