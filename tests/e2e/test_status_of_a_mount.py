"""End to end: `lazyfs status` on a running mount reads every file's state at
once, from the mount's `.lazyfs/states.json`, instead of two getxattr per file
(a readiness probe of 60,000 files took a minute and 40 s of the daemon's CPU)."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, wait_until
from support.proxy import Fault
from support.s3server import clean_env

pytestmark = pytest.mark.fuse

P = "models/m"
PART = 64 * 1024

# `lazyfs status ARGS...` in a process that counts the getxattr calls it makes
# (printed last on stderr); `walk` first: the old way, each file asked in turn.
_COUNTED = """
import os, sys
from lazyfs import cli, status
calls = []
real = os.getxattr
def counted(*args, **kwargs):
    calls.append(args)
    return real(*args, **kwargs)
os.getxattr = counted
if sys.argv[1] == "walk":
    status._states_file = lambda path: None
try:
    code = cli.main(["status", *sys.argv[2:]])
finally:
    print("getxattr calls:", len(calls), file=sys.stderr)
sys.exit(code)
"""


def status_counting(how: str, *args: str) -> tuple[str, int, int]:
    """stdout, exit code and the getxattr calls of a status run."""
    res = subprocess.run([sys.executable, "-c", _COUNTED, how, *args], capture_output=True, text=True,
                         timeout=120, env=clean_env())
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("getxattr calls: "), res.stderr
    return res.stdout, res.returncode, int(last.rsplit(" ", 1)[1])


def test_status_of_a_mount_asks_every_state_in_one_read(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    names = ["cached.bin", "prebaked.bin", "missing.bin", "downloading.bin", "a.bin", "a-b/x.bin", "a/y.bin",
             "a/deep/z.bin", "b.bin"]
    for n in names:
        s3.put_object(Bucket=bucket, Key=f"{P}/{n}", Body=os.urandom(4 * PART))
    store = tmp_path / "store"
    (store / P).mkdir(parents=True)
    (store / f"{P}/prebaked.bin").write_bytes(b"p" * 4 * PART)  # an admin's copy: the right size, no record
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "1", store=store)
    fs.read(m.file(f"{P}/cached.bin"))
    wait_until(lambda: fs.run(os.getxattr, str(m.file(f"{P}/cached.bin")), "user.lazyfs.state") == b"cached",
               what="publication")
    proxy.add(Fault("stall", key=f"{P}/downloading.bin", min_offset=PART, seconds=30, times=None))
    fd = fs.run(os.open, str(m.file(f"{P}/downloading.bin")), os.O_RDONLY)
    try:
        assert len(fs.run(os.pread, fd, 100, 0)) == 100
        # The file answers what each file's attributes answer.
        rows = json.loads(fs.read(m.path / ".lazyfs" / "states.json"))
        assert rows["listed"] is True
        got = {key: (state, verified) for key, size, state, verified in rows["files"]}
        asked = {f"{P}/{n}": (fs.run(os.getxattr, str(m.file(f"{P}/{n}")), "user.lazyfs.state").decode(),
                              fs.run(os.getxattr, str(m.file(f"{P}/{n}")), "user.lazyfs.verified").decode())
                 for n in names}
        assert got == asked
        assert {k: s for k, (s, _) in got.items() if "/a" not in k and "b.bin" not in k} == {
            f"{P}/cached.bin": "cached", f"{P}/prebaked.bin": "prebaked", f"{P}/missing.bin": "missing",
            f"{P}/downloading.bin": "downloading"}
        assert {size for _, size, _, _ in rows["files"]} == {4 * PART}
        # status reads it, with no getxattr at all, and prints what a walk asking each file prints.
        for args in ([str(m.path), "--require-all"], ["--store", str(m.path)], [str(m.path), "--json"]):
            out, code, calls = status_counting("states", *args)
            assert calls == 0, f"status asked {calls} attributes through the mount"
            walked, walked_code, walked_calls = status_counting("walk", *args)
            assert walked_calls == 2 * len(names), "the walk asks each file twice"
            assert (out, code) == (walked, walked_code), args
            if args[-1] == "--require-all":
                assert code == 1 and "1 cached, 1 prebaked, 1 downloading, 0 partial, 0 stale, 6 missing (not " \
                    "ready;" in out, out
    finally:
        fs.run(os.close, fd)
    table, code, _ = status_counting("states", str(m.path))
    assert code == 0
    assert [line.split()[-1] for line in table.splitlines()[1:-1]] == [
        f"{P}/{n}" for n in ["a.bin", "b.bin", "cached.bin", "downloading.bin", "missing.bin", "prebaked.bin",
                             "a/y.bin", "a/deep/z.bin", "a-b/x.bin"]], "os.walk's order: a folder's files first"


def test_a_mount_without_xattrs_has_no_states_file(mount, s3, bucket, fs: FS):
    s3.put_object(Bucket=bucket, Key=f"{P}/x.bin", Body=b"x")
    m = mount("--prefix", f"s3://{bucket}/{P}", "--no-xattrs")
    assert fs.listdir(m.path / ".lazyfs") == ["stats.json"]
    res = lazyfs_cli(["status", str(m.path), "--require-all"])
    assert res.returncode == 1 and "--no-xattrs and cannot tell file states" in res.stdout, res.stdout


def _mapped(path: str) -> bytes:
    """The file as a reader that maps it sees it: as long as its size says."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return mapped[:]


def test_the_status_files_show_their_true_size_to_stat_cp_and_mmap(mount, s3, bucket, fs: FS, tmp_path: Path):
    """states.json showed size 0: `cat` read it, but `stat` and `ls -l` said
    0, shutil.copy (sendfile, sized by it) copied nothing and mmap refused an
    empty file.  Its size is that of the snapshot an open reads now; a
    reader is told the size of the very bytes it gets (stats.json's was
    taken apart from them: a map of it could end mid-document)."""
    for i in range(40):
        s3.put_object(Bucket=bucket, Key=f"{P}/f{i:02d}.bin", Body=b"x" * (i + 1))
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store")
    states = m.path / ".lazyfs" / "states.json"
    body = fs.read(states)
    assert len(json.loads(body)["files"]) == 40
    assert fs.stat(states).st_size == len(body)
    assert fs.sh("stat", "-c", "%s", str(states)).stdout.strip() == str(len(body))
    assert fs.sh("head", "-c", "20", str(states)).stdout == body[:20].decode()
    fs.run(shutil.copy, str(states), str(tmp_path / "copy.json"))
    assert (tmp_path / "copy.json").read_bytes() == body
    assert fs.run(_mapped, str(states)) == body
    # A file turning cached since: the next look sees it, with its new size.
    fs.read(m.file(f"{P}/f07.bin"))
    wait_until(lambda: fs.run(os.getxattr, str(m.file(f"{P}/f07.bin")), "user.lazyfs.state") == b"cached",
               what="publication")
    now = fs.run(_mapped, str(states))  # whole (a size from before would cut it or pad it with zeros)
    assert [r[2] for r in json.loads(now)["files"] if r[0] == f"{P}/f07.bin"] == ["cached"]
    stats = fs.run(_mapped, str(m.path / ".lazyfs" / "stats.json"))
    assert stats.endswith(b"}\n") and json.loads(stats)["objects"] == 40
