"""End to end: what a failed attempt of the CRT client (`--transfer-client
crt`) leaves behind.  Its retries are lazyfs's own (crt.py): a throttled
attempt must not slow the rest of the file down (partpace.py sizes the
requests from the attempt that delivered)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from support.mounting import FS
from support.proxy import Fault

pytestmark = [pytest.mark.fuse]

P = "models/m"
BLOCK = 1024 * 1024
PART = 8 * BLOCK  # --part-size's default


@pytest.mark.parametrize("transfer_client", ["crt"], indirect=True)
def test_a_throttled_first_block_leaves_the_rest_of_the_file_in_whole_parts(mount, proxy, s3, bucket, fs: FS,
                                                                           tmp_path: Path, transfer_client: str):
    """Three SlowDowns on a file's first block (the CRT's first request is
    that block alone): the pace timed that request from its first attempt,
    backoff included (about 3 s for 1 MiB), took the link for a slow one and
    sent the next ones a block at a time: a 64 MiB file took 23 to 33 GETs,
    not 9 (+ the 3 refused).  A throttled attempt says nothing of the link's
    speed."""
    key = f"{P}/big.bin"
    data = os.urandom(64 * BLOCK)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store")
    fs.listdir(m.path / P)
    proxy.add(Fault("status", key=key, status=503, code="SlowDown", times=3))
    assert fs.read(m.file(key), timeout=120) == data
    gets = proxy.requests("GET", key)
    refused = [r["range"] for r in gets if r["status"] == 503]
    assert refused == [f"bytes=0-{BLOCK - 1}"] * 3, "the faults did not hit the first block"
    delivered = [r["range"] for r in gets if r["status"] == 206]
    unthrottled = 1 + math.ceil((len(data) - BLOCK) / PART)  # the first block, then whole parts
    # (a little room: a loaded machine may slow a part down enough to shrink the next)
    assert len(delivered) <= unthrottled + 2, f"{len(delivered)} GETs where {unthrottled} do: {delivered}"
