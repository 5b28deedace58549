"""End to end: a slow link that every connection shares (the proxy's link
rate, as `tc tbf` on a real one), read cold with the default 16 connections.

Alone on the link, the file's first block comes fast; then the sweep's
parallel requests share the link, each at a sixteenth of that.  The CRT
shows no byte of a request before all of it is in (partpace.py): its
requests were sized from the lone block's rate, so each took 16 times
longer than planned.  A reader waiting inside one got `EIO` (the README
promises the bytes, as they arrive), and requests cancelled as stalled
threw away what they had received (the tester's server sent 139 MB for a
100 MiB file).  Here a block per connection lands well within the deadline,
a part does not."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from support.mounting import FS, on_both_clients

pytestmark = [pytest.mark.fuse, pytest.mark.long, on_both_clients]

P = "models/m"
BLOCK = 1024 * 1024
PART = 4 * BLOCK
CONNECTIONS = 16  # --max-connections' default
LINK = 4_000_000  # bytes per second, all connections together
WAIT = 10  # seconds: --read-deadline, or --read-timeout


@pytest.mark.parametrize("flags", [["--read-deadline", str(WAIT)], ["--read-timeout", str(WAIT)]],
                         ids=["short-deadline", "short-read-timeout"])
def test_a_file_over_a_slow_shared_link_reads_whole_with_little_waste(mount, proxy, s3, bucket, fs: FS,
                                                                     tmp_path: Path, flags: list[str]):
    """`short-deadline`: a reader waiting for a block inside a part (4 MiB at
    a fifteenth of the link: ~16 s) got EIO after 10 s.  `short-read-timeout`
    (the default deadline): parts were cancelled as stalled after 10 s and
    asked for again, and the server sent far more than the file (1.7 times)."""
    per_connection = LINK / CONNECTIONS
    assert BLOCK / per_connection < WAIT / 2 and PART / per_connection > WAIT * 1.5  # (what the test is about)
    key = f"{P}/big.bin"
    data = os.urandom(64 * BLOCK)  # the sweep fills every connection with parts
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "4MiB", *flags, store=tmp_path / "store")
    fs.listdir(m.path / P)
    proxy.link(LINK)
    got = fs.run(lambda: hashlib.sha256(m.file(key).read_bytes()).hexdigest(), timeout=120)
    assert got == hashlib.sha256(data).hexdigest()
    sent = proxy.bytes_sent(key)
    assert sent <= len(data) * 1.05, f"the server sent {sent} bytes for a file of {len(data)}"
    assert "stalled" not in m.log(), [ln for ln in m.log().splitlines() if "stalled" in ln]
