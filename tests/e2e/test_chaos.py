"""Chaos (issue 11): everything at once, for a bounded time, on real mounts.

Two mounts share one store on a small tmpfs that fills up; readers read whole
files and random ranges through both; objects get new versions (some while
they download); the proxy injects 5xx, resets, short bodies and stalls; both
mounts refresh every second.  At the end: every byte any reader got belongs
to one whole version of its object, both mounts still answer, and neither
holds more files open or more threads than after the warm-up.
"""

from __future__ import annotations

import base64
import errno
import os
import random
import threading
import time
from pathlib import Path

import pytest

from support.filesystems import mounted_tmpfs
from support.mounting import FS
from support.proxy import Fault

pytestmark = [pytest.mark.fuse, pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(300)]

P = "models/chaos"
KiB, MiB = 1024, 1024 * 1024
CHAOS_S = 45.0
# Errors a reader may see in this weather; anything else fails the test.
EXPECTED = {errno.EIO, errno.ESTALE, errno.ENOENT, errno.ENOSPC}
FAST = ("--retries", "2", "--read-timeout", "2", "--read-deadline", "20", "--refresh", "1")


@pytest.fixture
def small_disk(tmp_path: Path):
    with mounted_tmpfs(tmp_path / "store", "size=24m,mode=0700", "the chaos test") as path:
        yield path


def open_files(pid: int) -> int:
    """Regular files and devices the process holds (not sockets or pipes: idle
    keep-alive connections come and go)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd).startswith("/"):
                count += 1
        except OSError:
            pass
    return count


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


# A read that waits longer than --read-deadline gets EIO (an allowed errno
# here), from its own download or from one it follows in the other mount.
@pytest.mark.log_errors("download of .* failed", "needs .* but the store", "cannot write it to the store",
                        "No space left", "has no current local copy", "could not record download progress",
                        "listing failed", "could not save the listing", "no data for bytes .* within",
                        "another lazyfs process is downloading it and bytes .* did not arrive within")
def test_chaos(mount, proxy, s3, bucket, fs: FS, small_disk: Path):
    rnd = random.Random(11)
    keys = [f"{P}/f{i:02d}.bin" for i in range(10)]
    versions: dict[str, list[bytes]] = {k: [] for k in keys}
    lock = threading.Lock()

    def new_version(k: str) -> bytes:
        data = os.urandom(rnd.randrange(1, 5) * MiB + rnd.randrange(64 * KiB))
        with lock:
            versions[k].append(data)
        return data

    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=new_version(k))
    args = ("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", *FAST)
    # One mount per transfer client: both send their GETs through the weather.
    mounts = [mount(*args, "--transfer-client", "boto3", store=small_disk),
              mount(*args, "--transfer-client", "crt", store=small_disk)]
    bad: list[str] = []
    seen_errors: dict[int, int] = {}
    reads = [0]
    stop = threading.Event()

    def check(k: str, off: int, got: bytes, size: int) -> None:
        with lock:
            good = [v for v in versions[k] if len(v) == size and v[off:off + len(got)] == got]
        if not good:
            bad.append(f"{k}: {len(got)} bytes at {off} (size {size}) match no version")

    def reader(n: int) -> None:
        r = random.Random(n)
        while not stop.is_set():
            k, m = r.choice(keys), r.choice(mounts)
            try:
                with open(m.file(k), "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if r.random() < 0.4:
                        check(k, 0, f.read(), size)
                    else:
                        for _ in range(6):
                            off = r.randrange(max(1, size))
                            f.seek(off)
                            check(k, off, f.read(r.choice((4 * KiB, 300 * KiB))), size)
                reads[0] += 1
            except OSError as e:
                seen_errors[e.errno or 0] = seen_errors.get(e.errno or 0, 0) + 1
                if e.errno not in EXPECTED:
                    bad.append(f"{k}: unexpected {e!r}")

    def weather() -> None:
        r = random.Random(99)
        while not stop.wait(1.0):
            k = r.choice(keys)
            kind = r.choice(["status", "reset", "short", "stall", "replace", "new"])
            if kind == "new":
                s3.put_object(Bucket=bucket, Key=k, Body=new_version(k))
            elif kind == "replace":  # just before a later ranged GET of it
                body = base64.b64encode(new_version(k)).decode()
                proxy.add(Fault("replace", key=k, skip=r.randrange(1, 4), times=1, body_b64=body))
            else:
                proxy.add(Fault(kind, key=k, after=r.randrange(1, 200) * KiB, status=503, code="SlowDown",
                                seconds=3.0, times=r.randrange(1, 4)))

    workers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(6)]
    workers.append(threading.Thread(target=weather, daemon=True))
    for w in workers:
        w.start()
    time.sleep(CHAOS_S / 3)
    warm = [(open_files(m.process.pid), threads(m.process.pid)) for m in mounts]
    time.sleep(CHAOS_S * 2 / 3)
    stop.set()
    for w in workers:
        w.join(60)
        assert not w.is_alive(), "a reader hung"
    proxy.clear_faults()

    assert not bad, bad[:10]
    assert reads[0] > 100, f"only {reads[0]} reads got through: {seen_errors}"
    for m in mounts:
        assert m.process.alive(), m.log()[-3000:]
        fs.stat(m.path)  # the mount answers
        assert len(fs.listdir(m.path / P)) == len(keys)
    time.sleep(12)  # downloads settle; idle worker threads leave trio's cache
    for m, (files0, threads0) in zip(mounts, warm, strict=True):
        files, nthreads = open_files(m.process.pid), threads(m.process.pid)
        assert files <= files0, f"open files grew from {files0} to {files}"
        assert nthreads <= max(threads0, 24), f"threads grew from {threads0} to {nthreads}"
    print(f"\nchaos: {reads[0]} whole or ranged reads checked, errors seen by readers {seen_errors}; "
          f"open files and threads after warm-up {warm}")
