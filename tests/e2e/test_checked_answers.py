"""End to end: every GET's answer is checked against what was asked before a
byte of it is written where a reader can see it.  The proxy plays a server (or
a cache, a gateway in front of one) that answers something else: a range
request with 200 and the whole object, another range than asked, and a
replaced object served despite If-Match.  Every byte a reader reads while the
file arrives is compared, and so is the file published after.

The objects carry no checksum and the mount has --no-etag-check: a file S3
offers nothing to check against is published unverified, so wrong bytes that
got in would stay (the window the answers' check closes)."""

from __future__ import annotations

import base64
import errno
import os
from pathlib import Path

import pytest

from support.mounting import FS, on_both_clients, wait_until
from support.proxy import Fault
from support.s3server import s3_client

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/m"
KEY = f"{P}/w.bin"
PART = 64 * 1024
MiB = 1 << 20
SIZE = 3 * MiB + 4321
CHUNK = 64 * 1024


@pytest.fixture
def data(moto, bucket) -> bytes:
    """The object, uploaded with no checksum: only its ETag describes it."""
    body = os.urandom(SIZE)
    s3_client(moto.endpoint, checksums=False).put_object(Bucket=bucket, Key=KEY, Body=body)
    return body


@pytest.fixture
def umount(mount, tmp_path: Path, bucket):
    def start(*extra: str):  # type: ignore[no-untyped-def]
        return mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "2",
                     "--no-etag-check", "--retries", "2", "--read-timeout", "2", "--read-deadline", "20", *extra,
                     store=tmp_path / "store")

    return start


def read_while_arriving(path: Path, expected: bytes) -> tuple[int, int]:
    """Read the file from its open on, a chunk at a time, each compared with
    `expected`: (bytes read, the errno that stopped the reader or 0)."""
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < len(expected):
            try:
                chunk = f.read(CHUNK)
            except OSError as e:
                return done, e.errno or -1
            assert chunk, f"end of file at {done} of {len(expected)}"
            if chunk != expected[done:done + len(chunk)]:
                wrong = next(i for i, b in enumerate(chunk) if b != expected[done + i])
                raise AssertionError(f"a wrong byte read at {done + wrong} (read from {done})")
            done += len(chunk)
    return done, 0


def download_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if "download of" in ln and "failed" in ln]


@pytest.mark.log_errors("download of .* failed: .*the object store")
@pytest.mark.parametrize("fault, cause", [
    (Fault("ignore", ignore=["Range"]), "the object store ignored the Range header"),
    (Fault("shift", shift=4096), "the object store answered bytes"),
], ids=["range-ignored", "range-shifted"])
def test_an_answer_with_other_bytes_than_asked_is_never_written(umount, proxy, data, fs: FS, fault: Fault,
                                                                  cause: str):
    fault.key, fault.min_offset = KEY, MiB  # one request after the file's first bytes
    proxy.add(fault)
    m = umount()
    read, err = fs.run(read_while_arriving, m.file(KEY), data, timeout=60)
    assert any(r["fault"] == fault.kind for r in proxy.requests("GET", KEY)), "the fault never fired"
    assert err == errno.EIO and 0 < read < SIZE, (read, err)  # (bytes before it were right)
    [line] = download_lines(m.log())
    assert cause in line and " ERROR " in line, line
    assert "nothing of it was written" in line, line
    # Not tried again: the store would answer the same.
    assert sum(r["fault"] == fault.kind for r in proxy.requests("GET", KEY)) == 1
    proxy.clear_faults()
    assert fs.run(read_while_arriving, m.file(KEY), data, timeout=60) == (SIZE, 0)
    wait_until((m.store / KEY).exists, what="publication")
    assert (m.store / KEY).read_bytes() == data


def test_a_replaced_object_served_despite_if_match_is_never_mixed_in(umount, proxy, data, fs: FS):
    """The key is overwritten just before one ranged GET, and the server
    ignores If-Match: it answers the new version's bytes (its ETag says so).
    The reader of the old version gets ESTALE, never a byte of the new one;
    its next open reads the new version whole."""
    new = os.urandom(SIZE)  # the same size: only the ETag tells the versions apart
    proxy.add(Fault("replace", key=KEY, min_offset=MiB, times=1, ignore=["If-Match"],
                    body_b64=base64.b64encode(new).decode()))
    proxy.add(Fault("ignore", key=KEY, times=None, ignore=["If-Match"]))  # every GET, as s3rver does
    # The proxy overwrites the object before it forwards that GET, which on a loaded machine took
    # longer than a 2 s --read-timeout: the GET was given up as stalled and sent again, and when the
    # overwrite landed after the second one was answered, every byte was the old version's, the
    # reader rightly got them all, and the overwrite came after the download.
    m = umount("--refresh", "0", "--read-timeout", "30", "--read-deadline", "60")
    read, err = fs.run(read_while_arriving, m.file(KEY), data, timeout=60)
    assert any(r["fault"] == "replace" for r in proxy.requests("GET", KEY)), "the fault never fired"
    assert err == errno.ESTALE and 0 < read < SIZE, (read, err)
    [line] = [ln for ln in m.log().splitlines() if "during the download" in ln]
    assert "changed in the object store" in line and "ignored If-Match" in line, line
    assert fs.run(read_while_arriving, m.file(KEY), new, timeout=60) == (SIZE, 0)
    wait_until((m.store / KEY).exists, what="publication")
    assert (m.store / KEY).read_bytes() == new


def test_a_head_answered_for_another_version_despite_if_match_is_not_what_the_bytes_are_checked_against(
        mount, proxy, bucket, moto, fs: FS, tmp_path: Path):
    """The HEAD verification sends after the GETs (the listing names a
    checksum ranged GETs do not carry) meets the object just replaced, and
    the server ignores its If-Match: it answers the new version's checksum.
    The bytes were checked against it, called corrupt and thrown away (the
    reader got ESTALE); the HEAD's ETag says it is another version, so they
    are the listed version's, checked by its ETag and published, as after a
    412 (completion.expectation)."""
    body = os.urandom(SIZE)
    s3_client(moto.endpoint).put_object(Bucket=bucket, Key=KEY, Body=body)  # with a CRC32 the listing names
    # Answered as if replaced, the object itself left as listed: the HEAD hash_along sends at the first
    # response would otherwise replace it while GETs are still to come (their If-Match: ESTALE, rightly).
    proxy.add(Fault("replace", method="HEAD", key=KEY, times=1, ignore=["If-Match"], elsewhere=True,
                    body_b64=base64.b64encode(os.urandom(SIZE)).decode()))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--refresh", "0",
              store=tmp_path / "store")
    assert fs.run(read_while_arriving, m.file(KEY), body, timeout=60) == (SIZE, 0)
    wait_until((m.store / KEY).exists, timeout=30, what="publication")
    assert any(r["fault"] == "replace" for r in proxy.requests("HEAD", KEY)), "the fault never fired"
    assert fs.run(os.getxattr, str(m.file(KEY)), "user.lazyfs.verified") == b"MD5"
    assert (m.store / KEY).read_bytes() == body
    [line] = [ln for ln in m.log().splitlines() if "replaced since its bytes were fetched" in ln]
    assert "a HEAD pinned to ETag" in line and "ignored If-Match); checking them by its ETag" in line, line
    assert "do not match" not in m.log()
