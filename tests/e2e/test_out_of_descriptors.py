"""End to end: a mount that runs out of file descriptors (README, the failure
table; exhausted.py).  Its limit is lowered at run time with `prlimit --pid`,
after it has served files (its FUSE session, its connections and a few
copies exist), and then many different files are opened at once and held:
the store-side opens (a download's lock and sparse file, a copy's descriptor,
a resume record) meet EMFILE.  A reader gets EMFILE; each line names the
limit (`ulimit -n`), never a bare "Too many open files" that leaves an
operator guessing whose files those are; and once the limit is raised again
every file reads right.

Only the soft limit is lowered and raised: raising a hard limit takes
CAP_SYS_RESOURCE, which a container's root may lack.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
from pathlib import Path

import pytest

from support.mounting import FS, wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

P = "models/m"
NAMED = r"the daemon's descriptor limit \(ulimit -n / RLIMIT_NOFILE\) is \d+"


def soft_limit(pid: int) -> int:
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]


def set_soft_limit(pid: int, soft: int) -> None:
    subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:"], check=True, capture_output=True, timeout=10)


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_and_read(path: Path, held: list[int]) -> bytes | tuple[str, str]:
    """The file's bytes, read through a descriptor that stays open (`held`),
    or the call that failed and its errno."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return "open", errno.errorcode.get(e.errno or 0, str(e.errno))
    held.append(fd)
    try:
        out = b""
        while chunk := os.read(fd, 1 << 20):
            out += chunk
        return out
    except OSError as e:
        return "read", errno.errorcode.get(e.errno or 0, str(e.errno))


@pytest.mark.log_errors(NAMED)
def test_store_side_descriptors_refused_name_the_limit_and_every_file_reads_once_it_is_raised(
        mount, s3, bucket, fs: FS, tmp_path: Path):
    files = {f"{P}/d{i % 3}/f{i:02d}.bin": os.urandom(30_000 + i) for i in range(60)}
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--retries", "1", store=store)
    keys = sorted(files)
    for key in keys[:10]:  # served: copies in the store, whose opens need a descriptor each
        assert fs.read(m.file(key)) == files[key]
    wait_until(lambda: all((store / key).exists() for key in keys[:10]), what="the first copies published")
    pid = m.process.pid
    before = soft_limit(pid)
    lowered = open_descriptors(pid) + 6
    set_soft_limit(pid, lowered)
    held: list[int] = []
    try:
        # The copies last: their opens meet the limit too, not only downloads' (each needs a descriptor).
        readers = {key: fs.start(open_and_read, m.file(key), held) for key in keys[10:] + keys[:10]}
        got = {key: f.result(timeout=120) for key, f in readers.items()}
    finally:
        for fd in held:
            os.close(fd)
        set_soft_limit(pid, before)
    refused = {key: v for key, v in got.items() if isinstance(v, tuple)}
    assert refused, "no open was refused: the limit was never met and the test proves nothing"
    assert set(refused.values()) <= {("open", "EMFILE"), ("read", "EMFILE")}, refused  # README: EMFILE
    wrong = [key for key, v in got.items() if not isinstance(v, tuple) and v != files[key]]
    assert wrong == [], "a file read whole or failed: never torn bytes"

    for key, data in files.items():  # the limit raised: every file, the refused ones too, reads right
        assert fs.read(m.file(key), timeout=60) == data, key
    log = m.log()
    assert "Traceback" not in log
    bare = [line for line in log.splitlines() if "Too many open files" in line]
    assert bare == [], "a line said the bare strerror, not whose limit ran out:\n" + "\n".join(bare[:10])
    store_side = [line for line in log.splitlines() if " the store" in line and "too many open files" in line]
    assert store_side, "no store-side open met the limit: the test proves nothing"
    assert all(f"(ulimit -n / RLIMIT_NOFILE) is {lowered}" in line for line in store_side), store_side[:5]
