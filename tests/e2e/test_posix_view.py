"""End to end: what POSIX tools see of a mount, through the CLI against moto.
Inode numbers that stay the same while the kernel forgets and looks up again
(tar --listed-incremental, rsync -H, find's loop check rely on them)."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import pytest

from support.mounting import FS

pytestmark = pytest.mark.fuse

P = "models/m"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def put_many(s3, bucket: str, keys: list[str]) -> None:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))


def forget_all_inodes(fs: FS) -> None:
    """Make the kernel evict every unused dentry and inode (as memory pressure
    does): it sends lazyfs a FORGET for each inode of the mount but the root."""
    if not os.access(DROP_CACHES, os.W_OK):
        pytest.skip("needs root to write /proc/sys/vm/drop_caches")
    fs.run(DROP_CACHES.write_text, "2", timeout=60)


def ids(fs: FS, *paths: Path) -> list[tuple[int, int]]:
    return [(st.st_dev, st.st_ino) for st in (fs.stat(p) for p in paths)]


def test_inode_numbers_stay_the_same_after_the_kernel_forgets_them(mount, s3, bucket, fs: FS, tmp_path: Path):
    """Before: `stat` after drop_caches gave the same file a new st_ino (4 -> 7,
    its folder 3 -> 6, a read file 7 -> 37)."""
    put_many(s3, bucket, [f"{P}/d/sub/f.txt", f"{P}/d/read.bin", f"{P}/top.json"])
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store")
    paths = [m.path / P / "d", m.path / P / "d/sub", m.file(f"{P}/d/sub/f.txt"), m.file(f"{P}/d/read.bin"),
             m.file(f"{P}/top.json")]
    assert fs.read(m.file(f"{P}/d/read.bin")) == f"{P}/d/read.bin".encode()
    before = ids(fs, *paths)
    assert len(set(before)) == len(paths)
    forget_all_inodes(fs)
    assert ids(fs, *paths) == before
    # What a user meets: an incremental backup after the kernel forgot finds nothing new.
    tar = [f"--listed-incremental={tmp_path / 'snapshot'}", "-C", str(m.path / P), "."]
    first = fs.sh("tar", "-cvf", str(tmp_path / "full.tar"), *tar, timeout=60)
    assert first.returncode == 0 and "f.txt" in first.stdout, first.stderr
    forget_all_inodes(fs)
    again = fs.sh("tar", "-cvf", str(tmp_path / "incr.tar"), *tar, timeout=60)
    assert again.returncode == 0, again.stderr
    assert [line for line in again.stdout.splitlines() if not line.endswith("/")] == [], again.stdout
    assert ids(fs, *paths) == before
