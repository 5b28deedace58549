"""End to end: what a failed attempt of the CRT client (`--transfer-client
crt`) leaves behind.  Its retries are lazyfs's own (crt.py): a throttled
attempt must neither slow the rest of the file down (partpace.py sizes the
requests from the attempt that delivered) nor be logged as the failure it
only becomes once the retries are spent."""

from __future__ import annotations

import errno
import math
import os
import re
from pathlib import Path

import pytest

from support.mounting import FS, on_both_clients
from support.proxy import Fault

pytestmark = [pytest.mark.fuse]

P = "models/m"
BLOCK = 1024 * 1024
PART = 8 * BLOCK  # --part-size's default


def retry_lines(log: str, key: str) -> list[str]:
    return [ln for ln in log.splitlines() if "retrying" in ln and key in ln]


@pytest.mark.parametrize("transfer_client", ["crt"], indirect=True)
def test_a_throttled_first_block_leaves_the_rest_of_the_file_in_whole_parts(mount, proxy, s3, bucket, fs: FS,
                                                                           tmp_path: Path, transfer_client: str):
    """Three SlowDowns on a file's first block (the CRT's first request is
    that block alone): the pace timed that request from its first attempt,
    backoff included (about 3 s for 1 MiB), took the link for a slow one and
    sent the next ones a block at a time: a 64 MiB file took 23 to 33 GETs,
    not 9 (+ the 3 refused).  A throttled attempt says nothing of the link's
    speed.

    The limits keep the two apart whatever the machine's load: a request
    may stay unseen 30 s (half of 60, measured alone), shared by 2, so a
    first block landing within about 1.8 s of its delivering attempt is
    followed by whole parts, while timed from the first attempt (3 s and
    more of backoff) it is followed by parts of 4 blocks.  At the defaults
    (20 s, 16 requests) the block had to land in 80 ms, and a loaded machine
    (load 13) slowed it enough to shrink the parts: 21 GETs without the bug.
    """
    key = f"{P}/big.bin"
    data = os.urandom(64 * BLOCK)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--read-timeout", "60", "--read-deadline", "60",
              "--max-connections", "2", store=tmp_path / "store")
    fs.listdir(m.path / P)
    proxy.add(Fault("status", key=key, status=503, code="SlowDown", times=3))
    assert fs.read(m.file(key), timeout=120) == data
    gets = proxy.requests("GET", key)
    refused = [r["range"] for r in gets if r["status"] == 503]
    assert refused == [f"bytes=0-{BLOCK - 1}"] * 3, "the faults did not hit the first block"
    delivered = [r["range"] for r in gets if r["status"] == 206]
    assert f"bytes={BLOCK}-{BLOCK + PART - 1}" in delivered, f"no whole part after the first block: {delivered}"
    unthrottled = 1 + math.ceil((len(data) - BLOCK) / PART)  # the first block, then whole parts
    # (a little room: a loaded machine may slow a part down enough to shrink the next)
    assert len(delivered) <= unthrottled + 2, f"{len(delivered)} GETs where {unthrottled} do: {delivered}"
    # One line per retry, each saying what happened to its attempt (the file, the answer, the attempt).
    lines = retry_lines(m.log(), key)
    assert len(lines) == 3, lines
    for attempt, line in enumerate(lines, 2):
        assert "SlowDown: HTTP 503; retrying bytes 0-1048575 in " in line, line
        assert f"(attempt {attempt} of 5)" in line and "kept failing" not in line, line


@on_both_clients
@pytest.mark.log_errors(r'download of .* failed: object store kept failing \(SlowDown')
def test_retries_say_what_happened_and_giving_up_says_kept_failing_once(mount, proxy, s3, bucket, fs: FS,
                                                                        tmp_path: Path, transfer_client: str):
    """A SlowDown on every GET, --retries 2: each retry's line says the attempt
    was throttled (the CRT's said "kept failing" from the first), the failure
    is one line once the retries are spent, the reader gets EIO (README,
    Failure behaviour: the faults persist), and the next open tries again."""
    key = f"{P}/w.bin"
    data = os.urandom(3 * BLOCK)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--retries", "2", store=tmp_path / "store")
    fs.listdir(m.path / P)
    proxy.add(Fault("status", key=key, status=503, code="SlowDown", times=None))
    with pytest.raises(OSError) as info:
        fs.read(m.file(key), timeout=60)
    assert info.value.errno == errno.EIO
    lines = retry_lines(m.log(), key)
    assert len(lines) == 2, lines
    for attempt, line in enumerate(lines, 2):
        assert "SlowDown: HTTP 503; retrying " in line and f"(attempt {attempt} of 3)" in line, line
        assert "kept failing" not in line, line
    failures = [ln for ln in m.log().splitlines() if re.search(r" (WARNING|ERROR) ", ln)]
    assert len(failures) == 1, failures
    assert key in failures[0] and "object store kept failing (SlowDown" in failures[0], failures
    tried = proxy.count("GET", key)
    proxy.clear_faults()
    assert fs.read(m.file(key), timeout=60) == data, "the next open did not try again"
    assert proxy.count("GET", key) > tried
