"""End to end: two mounts on one store, both with --cache-max-size.  Mount 1
downloads a file that a reader on mount 2 has open (mount 2 follows that
download through the store); once published, mount 1's budget evicts it at
once and a reader there opens it again (a fresh download).  The reader on
mount 2 had been served correct bytes from the file it followed: it reads
the rest from that file.  Mount 2 took the fresh download for a start over
after bad bytes (EIO: "bytes this open file read earlier failed
verification"), or the free lock for a dead owner, and downloaded the whole
file again (tester, issue 45 F1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.mounting import FS, on_both_clients, wait_until
from support.proxy import Fault

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/m"
MiB = 1024 * 1024
NOT_THESE = ("started its download over", "is gone", "failed verification", "continuing its download here")


def parts(store: Path) -> list[str]:
    return [n for n in os.listdir(store / ".lazyfs" / "tmp") if n.endswith(".part")]


def read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(MiB)


def read_rest(fd: int, start: int, size: int) -> bytes:
    got = bytearray()
    while start + len(got) < size:
        chunk = os.pread(fd, MiB, start + len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


def test_a_follower_reads_on_from_a_file_its_owner_published_and_evicted(mount, proxy, s3, bucket, fs: FS,
                                                                          tmp_path: Path):
    x, y = f"{P}/x.bin", f"{P}/y.bin"
    data, other = os.urandom(8 * MiB), os.urandom(8 * MiB)
    s3.put_object(Bucket=bucket, Key=x, Body=data)
    s3.put_object(Bucket=bucket, Key=y, Body=other)
    proxy.add(Fault("throttle", key=x, rate=MiB, times=None))  # a download of x takes seconds
    store = tmp_path / "store"
    args = ("--prefix", f"s3://{bucket}/{P}", "--part-size", "1MiB", "--max-connections", "2",
            "--cache-max-size", "10MiB")
    m1, m2 = mount(*args, store=store), mount(*args, store=store)

    # Mount 1 downloads x (its reader gone early: it is kept, and evicted as soon as it is published).
    assert fs.run(read_head, m1.file(x), timeout=30) == data[:MiB]
    wait_until(lambda: parts(store), what="mount 1's download of x")
    fd = fs.run(os.open, str(m2.file(x)), os.O_RDONLY)  # mount 2 follows it
    try:
        assert fs.run(os.pread, fd, MiB, 0, timeout=30) == data[:MiB]
        assert "being downloaded by another lazyfs process" in m2.log()
        # Mount 1 holds y open: once x is published, its budget evicts x at once.
        y_fd = fs.run(os.open, str(m1.file(y)), os.O_RDONLY)
        try:
            assert fs.run(read_rest, y_fd, 0, len(other), timeout=30) == other
            wait_until(lambda: f'fetched "s3://{bucket}/{x}"' in m1.log(), timeout=30, what="mount 1 to publish x")
            wait_until(lambda: "evicted" in m1.log() and not (store / x).exists(), timeout=10,
                       what="mount 1's budget to evict x")
            again = fs.start(lambda: m1.file(x).read_bytes())  # and a reader there opens x again
            wait_until(lambda: parts(store), what="mount 1's second download of x")
            # The reader on mount 2 reads the rest of the file it was following.
            assert fs.run(read_rest, fd, MiB, len(data), timeout=60) == data[MiB:]
            assert again.result(timeout=60) == data
        finally:
            fs.run(os.close, y_fd)
    finally:
        fs.run(os.close, fd)
    said = [line for line in m2.log().splitlines() if any(s in line for s in NOT_THESE)]
    assert not said, said
    assert f'fetched "s3://{bucket}/{x}"' not in m2.log(), "mount 2 downloaded again what it had, verified"
