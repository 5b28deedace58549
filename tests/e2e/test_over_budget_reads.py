"""End to end: a file larger than --cache-max-size is streamed through a
download that is not kept, and that download ends with the last close.  A
1-byte read used to fetch, verify and throw away the whole object on every
open (tester C: 4 opens of a 300 MiB file, 1.2 GB from S3), and a closed
file went on filling a temporary file of its full size."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from support.mounting import FS, on_both_clients, wait_until
from support.proxy import Fault

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/m"
MiB = 1024 * 1024


def read_one_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1)


def test_short_reads_of_a_file_larger_than_the_budget_fetch_far_less_than_it(mount, proxy, s3, bucket,
                                                                              fs: FS, tmp_path: Path):
    key, size = f"{P}/huge.bin", 24 * MiB
    data = os.urandom(size)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    proxy.add(Fault("throttle", key=key, rate=MiB, times=None))  # a whole file takes seconds, not milliseconds
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", "--cache-max-size", "4MiB", store=store)
    for _ in range(3):
        assert fs.run(read_one_byte, m.file(key)) == data[:1]
        time.sleep(1)
    wait_until(lambda: not [n for n in os.listdir(store / ".lazyfs" / "tmp") if n.endswith(".part")],
               timeout=15, what="the temporary files to be removed")
    time.sleep(2)  # (time for bytes it should not fetch)
    sent = proxy.bytes_sent(key)
    assert sent < size, f"{sent} bytes from S3 for 3 one-byte reads of a {size}-byte file"
    assert "nobody reads it any more" in m.log() and f"fetched \"s3://{bucket}/{key}\"" not in m.log()
    assert not (store / key).exists()
