"""End to end: a read failing again and again in a tight loop (repeats.py).

`mmap(MAP_POPULATE)` of a file whose reads fail never returns: the kernel
retries the failing page at once, for as long as the mapper lives.  lazyfs
answered each retry at once and logged each: 85,000 ERROR lines in 15 s and
most of a core.  The same failure now logs a line a minute, and a file's
failures in a tight loop are answered after a growing pause.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.mounting import FS
from support.proxy import Fault

pytestmark = pytest.mark.fuse

P = "models/m"
KEY = f"{P}/victim.bin"
OTHER = f"{P}/other.bin"
DEADLINE = "2"  # --read-deadline: a stalled read fails after it, and its retries at once
LOOP_S = 4.0  # how long the child reads on after its first failure

# A child that opens the file, reads its first page until it fails, then
# reads it again and again for LOOP_S: how many reads it made, and their
# errnos.  With "reopen", each read is through a new handle: open, read, close.
PREAD_LOOP = """
import collections, json, os, sys, time
errs = collections.Counter()
reopen = sys.argv[3] == "reopen"
held = None if reopen else os.open(sys.argv[1], os.O_RDONLY)
def read():
    fd = os.open(sys.argv[1], os.O_RDONLY) if reopen else held
    try:
        os.pread(fd, 4096, 0)
    except OSError as e:
        errs[e.errno] += 1
    finally:
        if reopen:
            os.close(fd)
read()
n, start = 0, time.monotonic()
while time.monotonic() - start < float(sys.argv[2]):
    read()
    n += 1
print(json.dumps({"reads": n, "errnos": sorted(errs)}))
"""

POPULATE = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
mmap.mmap(fd, 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
print("mapped")
"""


def stats(fs: FS, m) -> dict:
    return json.loads(fs.read(m.path / ".lazyfs" / "stats.json"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def failing(cause: str, mount, proxy, s3, bucket, tmp_path: Path):
    """A mount whose file KEY fails every read: its object deleted since the
    listing, or every GET of it stalled."""
    s3.put_object(Bucket=bucket, Key=KEY, Body=os.urandom(4 << 20))
    s3.put_object(Bucket=bucket, Key=OTHER, Body=b"fine")
    m = mount("--prefix", f"s3://{bucket}/{P}", "--read-deadline", DEADLINE, "--read-timeout", "60",
              "--retries", "1", store=tmp_path / "store")
    if cause == "deleted":
        s3.delete_object(Bucket=bucket, Key=KEY)
    else:
        proxy.add(Fault("stall", key=KEY, after=0, seconds=120, times=None))
    return m


def request_lines(m) -> list[str]:
    """The mount's lines about failed requests of KEY (one per request before)."""
    return [ln for ln in m.log().splitlines() if "lazyfs.fuse_ops" in ln and "victim.bin" in ln]


@pytest.mark.log_errors(r"lazyfs.fuse_ops: read: .*victim.bin")
@pytest.mark.parametrize("cause", ["deleted", "stalled"])
def test_reads_failing_in_a_tight_loop_are_paused_and_logged_rarely(mount, proxy, s3, bucket, fs: FS,
                                                                    tmp_path: Path, cause: str):
    m = failing(cause, mount, proxy, s3, bucket, tmp_path)
    before = cpu_seconds(m.process.pid)
    out = json.loads(fs.python(PREAD_LOOP, str(m.file(KEY)), str(LOOP_S), "keep", timeout=60))
    cpu = cpu_seconds(m.process.pid) - before
    assert out["errnos"], "no read failed: the test shows nothing"
    # Answered at once, the loop made thousands of reads (each a request or
    # two the daemon answered); paused, a few dozen at most.
    assert out["reads"] < 200, f"{out['reads']} reads in {LOOP_S:g} s: the failures were not paused"
    assert sum(stats(fs, m)["errors"].values()) < 400
    lines = request_lines(m)
    assert len(lines) <= 3, f"{len(lines)} lines about the failing file:\n" + "\n".join(lines[:10])
    assert cpu < LOOP_S / 2, f"the daemon used {cpu:.1f} CPU s answering a loop of failed reads"
    assert fs.read(m.file(OTHER), timeout=30) == b"fine", "another file's reads were held back"


@pytest.mark.log_errors(r"lazyfs.fuse_ops: read: .*victim.bin")
def test_a_loop_of_open_read_close_is_paused_as_one_handles_reads_are(mount, proxy, s3, bucket, fs: FS,
                                                                      tmp_path: Path):
    """The pause was a handle's: a program opening the file again for every
    read was answered at once for ever (about 5,000 reads in 4 s, most of a
    core in the daemon).  It is the file's now.  (An object deleted since the
    listing is no such loop: after the first failure its name is dropped, and
    the kernel itself refuses the opens.)"""
    m = failing("stalled", mount, proxy, s3, bucket, tmp_path)
    before = cpu_seconds(m.process.pid)
    out = json.loads(fs.python(PREAD_LOOP, str(m.file(KEY)), str(LOOP_S), "reopen", timeout=60))
    cpu = cpu_seconds(m.process.pid) - before
    assert out["errnos"] == [errno.EIO], out
    assert out["reads"] < 200, f"{out['reads']} open-read-close loops in {LOOP_S:g} s: the failures were not paused"
    assert len(request_lines(m)) <= 3, "\n".join(request_lines(m)[:10])
    assert cpu < LOOP_S / 2, f"the daemon used {cpu:.1f} CPU s answering a loop of failed reads"
    assert fs.read(m.file(OTHER), timeout=30) == b"fine", "another file's reads were held back"


@pytest.mark.log_errors(r"lazyfs.fuse_ops: read: .*victim.bin")
@pytest.mark.parametrize("cause", ["deleted", "stalled"])
def test_map_populate_of_a_failing_file_costs_few_lines_and_requests(mount, proxy, s3, bucket, fs: FS,
                                                                     tmp_path: Path, cause: str):
    """The kernel retries the populate's failing page until the mapper is
    killed (mm/gup.c): lazyfs cannot end that loop, only make it cheap."""
    m = failing(cause, mount, proxy, s3, bucket, tmp_path)
    child = subprocess.Popen([sys.executable, "-c", POPULATE, str(m.file(KEY))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        child.wait(timeout=5)  # Linux 6.x: still in mmap() by then
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=10)
    lines = request_lines(m)
    assert len(lines) <= 3, f"{len(lines)} lines about the failing file:\n" + "\n".join(lines[:10])
    assert sum(stats(fs, m)["errors"].values()) < 400, stats(fs, m)["errors"]


# A log line of a failure (not the DEBUG and INFO ones): its level, then what it says.
_FAILURE_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (.*)$")


@pytest.mark.log_errors(r"download of .*deny")
def test_a_denied_file_opened_again_and_again_logs_one_line(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """Each open of a file whose GETs are refused starts a download that fails: 30 `cat`s logged 30
    identical ERROR lines.  The same failure of the same file logs one line, then at most one a minute
    (with the count); another file's failure logs at once.  A refusal is the bucket's policy or the
    credentials, not lazyfs failing: a WARNING."""
    denied, other = f"{P}/deny.bin", f"{P}/deny-too.bin"
    for key in (denied, other):
        s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(100_000))
        proxy.add(Fault("status", key=key, status=403, code="AccessDenied", times=None))
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store")
    for _ in range(12):
        with pytest.raises(OSError) as info:
            fs.read(m.file(denied), timeout=30)
        assert info.value.errno == errno.EACCES
    assert proxy.count("GET", denied) >= 12, "the opens did not each try the object again: the test shows nothing"
    with pytest.raises(OSError) as info:
        fs.read(m.file(other), timeout=30)
    assert info.value.errno == errno.EACCES
    failures = [found.groups() for ln in m.log().splitlines() if (found := _FAILURE_LINE.match(ln))]
    about = {key: [f for f in failures if f'{key}"' in f[1]] for key in (denied, other)}
    assert len(about[denied]) == 1, "one line for the same failure:\n" + "\n".join(map(str, about[denied]))
    assert len(about[other]) == 1, "another file's failure logs at once"
    assert about[denied][0][0] == "WARNING" and "access denied" in about[denied][0][1], about[denied]
