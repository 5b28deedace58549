"""End to end: bytes that fail verification never complete a read of the
whole file, and an open file that was served them reads on no more; the next
open reads the right bytes (lazyfs/lastbytes.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, on_both_clients, wait_until
from support.proxy import Fault

pytestmark = pytest.mark.fuse

P = "models/m"
PART = 256 * 1024
BAD = "downloaded bytes do not match"


def whole_read(fs: FS, path: Path) -> bytes | int:
    """The file's bytes, or the errno a read of it failed with."""
    try:
        return fs.read(path)
    except OSError as e:
        return e.errno or 0


@pytest.mark.log_errors(BAD, "open the file again")
@on_both_clients
@pytest.mark.parametrize("size", [1000, 8 * PART + 17], ids=["one-request", "eight-parts"])
def test_a_read_of_the_whole_file_never_ends_on_bytes_that_failed_verification(size: int, mount, proxy, s3, bucket,
                                                                               fs: FS, tmp_path: Path):
    """The first GET's bytes come back flipped (right length): a reader of
    the whole file gets EIO or, if it was never served the bad bytes, the
    right ones; never a successful read of wrong bytes."""
    key = f"{P}/w.bin"
    data = os.urandom(size)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    proxy.add(Fault("corrupt", key=key, times=1))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", store=tmp_path / "store")
    got = whole_read(fs, m.file(key))
    assert got in (errno.EIO, data), "a read of the whole file ended on bytes that failed verification"
    assert any(r["fault"] == "corrupt" for r in proxy.requests("GET", key)), "the fault never fired"
    wait_until(lambda: "downloading it again" in m.log(), what="the failed check")
    assert fs.read(m.file(key)) == data, "the next open reads the right bytes"
    wait_until((tmp_path / "store" / key).exists, what="the right bytes published")
    assert (tmp_path / "store" / key).read_bytes() == data


@pytest.mark.log_errors(BAD, "open the file again")
@on_both_clients
def test_an_open_file_served_bytes_that_failed_verification_reads_on_no_more(mount, proxy, s3, bucket, fs: FS,
                                                                            tmp_path: Path):
    key = f"{P}/w.bin"
    data = os.urandom(8 * PART)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    proxy.add(Fault("corrupt", key=key, times=1))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", store=tmp_path / "store")
    fd = fs.run(os.open, str(m.file(key)), os.O_RDONLY)
    try:
        first = fs.run(os.pread, fd, 4096, 0)
        assert first != data[:4096], "the reader was served the corrupted first bytes"
        wait_until(lambda: "downloading it again" in m.log(), what="the failed check")

        def refused() -> bool:
            try:
                fs.run(os.pread, fd, 4096, 0)  # its cached pages are dropped: the read reaches lazyfs
            except OSError as e:
                assert e.errno == errno.EIO
                return True
            return False

        wait_until(refused, what="a read of the open file that was served bad bytes to fail")
        with pytest.raises(OSError) as info:
            fs.run(os.pread, fd, 4096, 7 * PART)  # elsewhere in the file too
        assert info.value.errno == errno.EIO
    finally:
        fs.run(os.close, fd)
    assert fs.read(m.file(key)) == data, "a new open reads the right bytes"
    assert "open the file again" in m.log(), "the refusal said why, once"
    assert m.log().count("bytes this open file read earlier failed verification") == 1


@pytest.mark.log_errors(BAD, "open the file again")
def test_a_pinned_mount_never_completes_a_read_of_unapproved_bytes(mount, proxy, s3, bucket, fs: FS,
                                                                  tmp_path: Path):
    """What the user met: a lock pinning the file, and a corrupted transfer."""
    key = f"{P}/w.bin"
    data = os.urandom(6 * PART + 5)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    lock = tmp_path / "model.lock.json"
    made = lazyfs_cli(["lock", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                       "-o", str(lock)], timeout=60)
    assert made.returncode == 0, made.stderr
    proxy.add(Fault("corrupt", key=key, times=1))
    m = mount("--lock", str(lock), "--part-size", "256KiB", store=tmp_path / "store")
    assert whole_read(fs, m.file(key)) in (errno.EIO, data)
    wait_until(lambda: "downloading it again" in m.log(), what="the failed check")
    assert fs.read(m.file(key)) == data
