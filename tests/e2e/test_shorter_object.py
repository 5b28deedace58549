"""End to end: an object replaced by a shorter one while it downloads, from a
store that ignores If-Match (s3rver does; the proxy plays it, moto behind it
honours If-Match).  A ranged GET for bytes the new object no longer has is
answered 416 (InvalidRange): inside the listed size, that is evidence of
another version, as a Content-Range of another total size is.  The reader of
the old version gets ESTALE with one line saying why, and the next open reads
the new version whole: for a download, and for a resumed one (whose blocks
on disk are the old version's), on both transfer clients."""

from __future__ import annotations

import base64
import errno
import json
import os
from pathlib import Path

import pytest

from support.mounting import FS, on_both_clients, wait_until
from support.proxy import Fault
from support.s3server import s3_client

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/m"
KEY = f"{P}/w.bin"
MiB = 1 << 20
SIZE = 3 * MiB + 4321
NEW = 4321  # shorter than a part: every GET after the first part's is past its end
CHUNK = 64 * 1024
CHANGED = "changed in the object store during the download"


@pytest.fixture
def data(moto, bucket) -> bytes:
    body = os.urandom(SIZE)
    s3_client(moto.endpoint).put_object(Bucket=bucket, Key=KEY, Body=body)
    return body


@pytest.fixture
def umount(mount, tmp_path: Path, bucket):
    def start():  # type: ignore[no-untyped-def]
        return mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "2",
                     "--refresh", "0", "--retries", "2", "--read-timeout", "30", "--read-deadline", "60",
                     store=tmp_path / "store")

    return start


def ignoring_if_match() -> Fault:
    """Every request for the key answered by whatever version it holds, as s3rver does."""
    return Fault("ignore", method=None, key=KEY, times=None, ignore=["If-Match"])


def read_while_arriving(path: Path, expected: bytes) -> tuple[int, int]:
    """Read the file from its open on, each chunk compared with `expected`:
    (bytes read, the errno that stopped the reader or 0)."""
    done = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while done < len(expected):
                chunk = f.read(CHUNK)
                assert chunk, f"end of file at {done} of {len(expected)}"
                assert chunk == expected[done:done + len(chunk)], f"a wrong byte read at or after {done}"
                done += len(chunk)
            assert f.read(CHUNK) == b"", "more bytes than the version has"
    except OSError as e:
        return done, e.errno or -1
    return done, 0


def recorded_start(store: Path) -> int:
    """The bytes from the start of the file its resume record says are on disk."""
    for record in (store / ".lazyfs" / "tmp").glob("*.json"):
        try:
            state = json.loads(record.read_text())
        except (OSError, ValueError):  # (being replaced)
            continue
        runs = state.get("runs") or [[0, 0]]
        if runs[0][0] == 0:
            return int(runs[0][1]) * int(state["block_size"])
    return 0


def changed_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if CHANGED in ln]


def test_a_range_past_the_end_of_a_shorter_new_version_is_estale_then_the_new_version(umount, proxy, data,
                                                                                       fs: FS):
    new = os.urandom(NEW)
    proxy.add(Fault("replace", key=KEY, min_offset=MiB, times=1, ignore=["If-Match"],
                    body_b64=base64.b64encode(new).decode()))
    proxy.add(ignoring_if_match())
    m = umount()
    read, err = fs.run(read_while_arriving, m.file(KEY), data, timeout=60)
    assert any(r["fault"] == "replace" for r in proxy.requests("GET", KEY)), "the fault never fired"
    assert any(r["status"] == 416 for r in proxy.requests("GET", KEY)), "no GET was answered 416"
    assert err == errno.ESTALE and 0 < read < SIZE, (read, err)  # (the old version's bytes before it)
    [line] = changed_lines(m.log())
    assert " WARNING " in line and "HTTP 416" in line and f"shorter now than the listed {SIZE} bytes" in line, line
    assert fs.run(read_while_arriving, m.file(KEY), new, timeout=60) == (NEW, 0)
    wait_until((m.store / KEY).exists, what="publication")
    assert (m.store / KEY).read_bytes() == new


@pytest.mark.log_errors("download of .* failed: access denied")
def test_a_resumed_download_of_a_version_now_shorter_is_estale_then_the_new_version(umount, proxy, data, s3,
                                                                                     bucket, fs: FS):
    """The first download stops at 1 MiB (a 403: not the object's fault, its
    blocks kept for a resume); the key is then overwritten by a shorter object
    and the listing still names the old version.  The next open resumes it,
    and its first GET, past the new end, is answered 416: ESTALE, one line,
    and the open after reads the new version, with no listing in between."""
    proxy.add(Fault("status", key=KEY, min_offset=MiB, times=None, status=403, code="AccessDenied"))
    m = umount()
    read, err = fs.run(read_while_arriving, m.file(KEY), data, timeout=60)
    assert err == errno.EACCES and 0 < read < SIZE, (read, err)
    wait_until(lambda: recorded_start(m.store) >= MiB, what="the resume record of the first MiB")
    new = os.urandom(NEW)
    s3.put_object(Bucket=bucket, Key=KEY, Body=new)
    proxy.clear_faults()
    proxy.add(ignoring_if_match())
    read, err = fs.run(read_while_arriving, m.file(KEY), data, timeout=60)
    assert "resuming download" in m.log(), m.log()[-3000:]
    assert any(r["status"] == 416 for r in proxy.requests("GET", KEY)), "no GET was answered 416"
    assert err == errno.ESTALE, (read, err)
    # Every failed open said why: the 403's line, and the change's.
    [line] = changed_lines(m.log())
    assert "HTTP 416" in line, line
    assert len([ln for ln in m.log().splitlines() if "download of" in ln and "access denied" in ln]) == 1
    assert fs.run(read_while_arriving, m.file(KEY), new, timeout=60) == (NEW, 0)
    lists = proxy.count("LIST")
    assert fs.run(read_while_arriving, m.file(KEY), new, timeout=60) == (NEW, 0)
    assert proxy.count("LIST") == lists
    wait_until((m.store / KEY).exists, what="publication")
    assert (m.store / KEY).read_bytes() == new
