"""End to end: after a CRT request stalls, lazyfs asks for the rest again
(crt.py).  Those follow-up requests were one request the client split into
parts of a block, and the client shows the headers of a request's first part
only: a later part answered with other bytes (another range) or by another
version (another ETag: If-Match ignored) went into the file unchecked, read
by readers and, with nothing else to check it against (--no-etag-check),
published.  Each follow-up GET's answer is checked as a first one is."""

from __future__ import annotations

import base64
import errno
import os
from pathlib import Path

import pytest

from support.mounting import FS, wait_until
from support.proxy import Fault

pytestmark = [pytest.mark.fuse, pytest.mark.parametrize("transfer_client", ["crt"], indirect=True)]

P = "models/m"
KEY = f"{P}/w.bin"
BLOCK = 1 << 20
SIZE = 4 * BLOCK  # the first block alone, then the rest [1 MiB, 4 MiB) in one request: the one that stalls


def read(path: Path) -> bytes | int:
    """The file's bytes, or the errno its read failed with."""
    try:
        return path.read_bytes()
    except OSError as e:
        return e.errno or -1


def wrong_answer(kind: str) -> Fault:
    """A wrong answer to the GET of the third block, [2 MiB, 3 MiB), once."""
    if kind == "shifted":
        return Fault("shift", key=KEY, min_offset=2 * BLOCK, shift=4096, times=1)
    return Fault("answer", key=KEY, min_offset=2 * BLOCK, times=1, status=206,
                 body_b64=base64.b64encode(os.urandom(BLOCK)).decode(),
                 headers={"ETag": '"0123456789abcdef0123456789abcdef"', "Content-Type": "binary/octet-stream",
                          "Content-Range": f"bytes {2 * BLOCK}-{3 * BLOCK - 1}/{SIZE}"})


@pytest.mark.log_errors("download of .* failed: .*(the object store answered bytes|changed in the object store)",
                        "changed in the object store")
@pytest.mark.parametrize("kind, errno_, said", [
    ("shifted", errno.EIO, f"the object store answered bytes {2 * BLOCK + 4096}-"),
    ("another-etag", errno.ESTALE, "answered with ETag \"0123456789abcdef0123456789abcdef\""),
])
def test_a_wrong_answer_to_a_request_after_a_stall_is_refused(mount, proxy, s3, bucket, fs: FS, tmp_path: Path,
                                                              kind: str, errno_: int, said: str):
    data = os.urandom(SIZE)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--no-etag-check", "--read-timeout", "2", "--retries", "2",
              store=tmp_path / "store")
    fs.listdir(m.path / P)
    proxy.add(Fault("stall", key=KEY, min_offset=BLOCK, after=0, seconds=30, times=1))
    proxy.add(wrong_answer(kind))
    got = fs.run(read, m.file(KEY), timeout=90)
    gets = proxy.requests("GET", KEY)
    fired = {r["fault"] for r in gets}
    assert {"stall", "shift" if kind == "shifted" else "answer"} <= fired, [(r["range"], r["fault"]) for r in gets]
    assert got == errno_, "a wrong answer after a stall was taken" if isinstance(got, bytes) else got
    assert "Traceback" not in m.log()
    lines = [ln for ln in m.log().splitlines() if " WARNING " in ln or " ERROR " in ln]
    assert any(said in ln and "w.bin" in ln for ln in lines), lines
    proxy.clear_faults()
    wait_until(lambda: fs.run(read, m.file(KEY), timeout=60) == data, what="the right bytes", timeout=60)
    wait_until((m.store / KEY).exists, what="publication")
    assert (m.store / KEY).read_bytes() == data
