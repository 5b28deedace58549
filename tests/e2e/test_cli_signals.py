"""How a command ends when it is stopped or its reader goes, run as a user
would (a subprocess).  Only `mount` treats SIGTERM/SIGINT as a clean stop
(exit 0: tests/e2e/test_mount_basics.py); every other command stopped by one
exits 128+signal with one line saying so, never a traceback or trio's
warnings; a bake stopped leaves only what its next run resumes from.  A
stdout closed by its reader (`| head`) exits 141, quietly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.mounting import lazyfs_cli, wait_until
from support.proxy import Fault, S3Proxy
from support.s3server import clean_env

P = "models/sig"


def start_cli(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lazyfs", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env())


def stop(proc: subprocess.Popen[str], sig: int) -> tuple[int, str, str]:
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running 60 s after {signal.Signals(sig).name}: {err}") from None
    return proc.returncode, out, err


def interrupted_line(err: str, command: str, sig: int) -> str:
    """The one line saying so; nothing a user would take for a crash."""
    assert "Traceback" not in err and "RuntimeWarning" not in err and "Exception ignored" not in err, err
    said = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(said) == 1, err
    assert said[0].startswith(f"lazyfs: {command} interrupted by {signal.Signals(sig).name}"), said[0]
    return said[0]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_bake_stopped_by_a_signal_fails_and_the_next_run_finishes_it(s3, bucket, proxy: S3Proxy,
                                                                         tmp_path: Path, sig: int) -> None:
    files = {f"{P}/f{i}.bin": os.urandom(256 * 1024 + i) for i in range(8)}
    for k, v in files.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    target = tmp_path / "baked"
    args = ["bake", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint, "--to", str(target),
            "--part-size", "64KiB", "--max-connections", "2"]
    proxy.add(Fault("delay", seconds=0.3, times=None))  # about 6 s for the whole bake
    proc = start_cli(args)
    try:
        wait_until(lambda: any((target / k).exists() for k in files), timeout=60, what="a first file baked")
    finally:
        code, out, err = stop(proc, sig)
    assert code == 128 + sig, out + err
    line = interrupted_line(err, "bake", sig)
    assert "run it again" in line and str(target) in line
    assert "lazyfs bake: 8 files:" not in out  # no summary: it did not finish
    baked = [k for k in files if (target / k).exists()]
    assert 0 < len(baked) < len(files), "the signal came too late to test anything"
    for k in baked:
        assert (target / k).read_bytes() == files[k]
    # What is left under tmp/ is the downloads it stopped, each with its resume record.
    tmp = target / ".lazyfs" / "tmp"
    names = sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
    assert not [n for n in names if n.endswith(".tmp")], names
    proxy.clear_faults()
    again = lazyfs_cli(args, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{len(baked)} already current" in again.stdout or \
        int(again.stdout.split(" already current")[0].rsplit(" ", 1)[1]) >= len(baked), again.stdout
    for k, v in files.items():
        assert (target / k).read_bytes() == v


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_lock_stopped_by_a_signal_fails_and_writes_no_lock(s3, bucket, proxy: S3Proxy, tmp_path: Path,
                                                             sig: int) -> None:
    for i in range(4):
        s3.put_object(Bucket=bucket, Key=f"{P}/f{i}.bin", Body=b"x" * (i + 1))
    proxy.add(Fault("delay", method="HEAD", seconds=30, times=None))  # every HEAD hangs
    out_path = tmp_path / "models.lock"
    proc = start_cli(["lock", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                      "-o", str(out_path)])
    try:
        wait_until(lambda: proxy.count("HEAD") > 0, timeout=60, what="the lock's HEADs")
    finally:
        code, out, err = stop(proc, sig)
    assert code == 128 + sig, out + err
    assert "no lock written" in interrupted_line(err, "lock", sig)
    assert list(tmp_path.iterdir()) == []  # neither the lock nor its temporary sibling


def test_status_stopped_by_sigterm_is_not_ready(s3, bucket, proxy: S3Proxy, tmp_path: Path) -> None:
    """A readiness probe (`status --require-all`) stopped must not read as ready."""
    s3.put_object(Bucket=bucket, Key=f"{P}/f.bin", Body=b"x")
    (tmp_path / "store").mkdir()
    proxy.add(Fault("delay", method="GET", seconds=30, times=None))  # the listing hangs
    proc = start_cli(["status", "--store", str(tmp_path / "store"), "--prefix", f"s3://{bucket}/{P}",
                      "--endpoint-url", proxy.endpoint, "--require-all"])
    try:
        wait_until(lambda: proxy.count("LIST") > 0, timeout=60, what="the status listing")
    finally:
        code, out, err = stop(proc, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out + err
    interrupted_line(err, "status", signal.SIGTERM)


def write_lock(path: Path, n: int) -> Path:
    """A lock of `n` files made by `lazyfs lock` needs S3; diff only reads."""
    from lazyfs import lockfile
    from lazyfs.lockfile import Entry, Folder

    entries = tuple(Entry("bkt", f"m/f{i:05d}.bin", 1000 + i, f"{i:032x}", "", 0, None) for i in range(n))
    path.write_text(lockfile.dumps(lockfile.make([Folder("bkt", "m/", entries)], (), "lazyfs test")))
    return path


def test_diff_into_a_closed_pipe_exits_141_quietly(tmp_path: Path) -> None:
    old, new = write_lock(tmp_path / "old.lock", 0), write_lock(tmp_path / "new.lock", 20000)
    for fmt in ([], ["--json"]):
        # `| head -c 10`: the reader takes a few bytes and goes.
        proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "diff", str(old), str(new), *fmt],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
        assert proc.stdout is not None and proc.stderr is not None
        try:
            assert len(proc.stdout.read(10)) == 10
            proc.stdout.close()
            err = proc.stderr.read().decode()
            assert proc.wait(timeout=60) == 141, err
        finally:
            proc.kill()
            proc.wait()
            proc.stderr.close()
        assert err == "", err


def test_diff_into_a_pipe_read_to_the_end_still_exits_0(tmp_path: Path) -> None:
    old, new = write_lock(tmp_path / "old.lock", 0), write_lock(tmp_path / "new.lock", 3)
    res = lazyfs_cli(["diff", str(old), str(new), "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["download"]["files"] == 3
