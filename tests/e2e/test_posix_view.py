"""End to end: what POSIX tools see of a mount, through the CLI against moto.
Inode numbers that stay the same while the kernel forgets and looks up again
(tar --listed-incremental, rsync -H, find's loop check rely on them); "." and
".." in every listing, read in as many getdents calls as it takes;
`df -i` that does not show every inode used; and folder dates that follow a
refresh all the way up."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path

import pytest

from support.mounting import FS, wait_until
from support.pagecache import KERNEL_CACHES

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


@KERNEL_CACHES
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


GETDENTS = """
import ctypes, json, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
buf = ctypes.create_string_buffer(int(sys.argv[2]))
calls, entries = 0, []
while True:
    n = libc.getdents64(fd, buf, len(buf))
    if n < 0:
        raise OSError(ctypes.get_errno(), "getdents64")
    if n == 0:
        break
    calls += 1
    pos = 0
    while pos < n:
        ino, off, reclen, kind = struct.unpack_from("QqHB", buf.raw, pos)
        name = buf.raw[pos + 19:pos + reclen].split(b"\\0", 1)[0].decode()
        entries.append([name, ino, off])
        pos += reclen
print(json.dumps({"calls": calls, "entries": entries}))
"""


def getdents(fs: FS, path: Path, buffer: int) -> tuple[int, list[list]]:
    out = json.loads(fs.python(GETDENTS, str(path), str(buffer), timeout=60))
    return out["calls"], out["entries"]


def test_listings_have_dot_and_dotdot_and_every_name_once(mount, s3, bucket, fs: FS, tmp_path: Path):
    """Before: `ls -la`, `ls -fa` and Perl's readdir showed no "." or "..".
    A folder of 1500 entries takes many FUSE requests (each a page of
    entries) and, read with a small buffer, many more getdents calls: each
    must resume where the last stopped."""
    names = [f"file-{i:04d}.bin" for i in range(1500)]
    put_many(s3, bucket, [f"{P}/big/{n}" for n in names] + [f"{P}/small/a.txt"])
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store")
    big, small = m.path / P / "big", m.path / P / "small"
    ls = fs.sh("ls", "-fa", str(small))
    assert ls.returncode == 0 and sorted(ls.stdout.split()) == [".", "..", "a.txt"], ls.stdout
    ls = fs.sh("ls", "-la", str(small))
    rows = {line.split()[-1]: line for line in ls.stdout.splitlines()[1:]}
    assert sorted(rows) == [".", "..", "a.txt"], ls.stdout
    assert rows["."].startswith("dr-xr-xr-x") and rows[".."].startswith("dr-xr-xr-x"), ls.stdout
    for buffer in (32768, 1024):
        calls, entries = getdents(fs, big, buffer)
        assert calls > 3
        assert [e[0] for e in entries] == [".", ".."] + names, "every entry exactly once, in order"
        offsets = [e[2] for e in entries]
        assert offsets == sorted(set(offsets))
        assert entries[0][1] == fs.stat(big).st_ino and entries[1][1] == fs.stat(m.path / P).st_ino
    big_ino = entries[0][1]
    _, root = getdents(fs, m.path, 4096)
    assert root[:2] == [[".", 1, 1], ["..", 1, 2]] and fs.stat(m.path).st_ino == 1
    # Every name the listings sent counted one lookup, and the dots none: once
    # the kernel forgets everything, the numbers still hold (and nothing broke).
    forget_all_inodes(fs)
    assert fs.listdir(big) == names and fs.stat(big).st_ino == big_ino


def test_df_i_shows_the_store_disks_inodes_not_all_used(mount, s3, bucket, fs: FS, tmp_path: Path):
    """Before: `df -i` showed every inode used (f_ffree 0, e.g. `3 3 0 100%`)
    on every mount, so inode-exhaustion alerts fired.  Inodes, like blocks,
    are the store's filesystem's."""
    put_many(s3, bucket, [f"{P}/a.bin", f"{P}/b.bin", f"{P}/c/d.bin"])
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    st, disk = fs.run(os.statvfs, str(m.path)), os.statvfs(store)
    assert (st.f_blocks, st.f_frsize) == (disk.f_blocks, disk.f_frsize), "df's blocks are the store's disk"
    if disk.f_files == 0:
        pytest.skip("the store's filesystem reports no inode counts")
    assert st.f_files == disk.f_files and st.f_ffree > 0 and abs(st.f_ffree - disk.f_ffree) < 1000
    df = fs.sh("df", "-i", str(m.path))
    assert df.returncode == 0, df.stderr
    use = df.stdout.splitlines()[-1].split()[4]
    assert use != "100%" and use == fs.sh("df", "-i", str(store)).stdout.splitlines()[-1].split()[4], df.stdout


def test_a_refresh_redates_every_folder_above_a_new_file(mount, s3, bucket, fs: FS, tmp_path: Path):
    """A folder is as new as its newest file anywhere below.  Before: after a
    refresh only the folder holding the new file showed the new date; `stat`
    of its parent and grandparent kept the old one for up to five minutes (the
    kernel's attribute cache), so two mounts showed different dates."""
    put_many(s3, bucket, [f"{P}/a/b/c/old.py", f"{P}/a/b/c/deep/.keep"])
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", store=tmp_path / "store")
    folders = [m.path / P / "a", m.path / P / "a/b", m.path / P / "a/b/c", m.path / P / "a/b/c/deep"]
    before = [fs.stat(p).st_mtime for p in folders]
    time.sleep(1.1)  # Last-Modified has whole seconds
    s3.put_object(Bucket=bucket, Key=f"{P}/a/b/c/deep/new.py", Body=b"x")
    new = s3.head_object(Bucket=bucket, Key=f"{P}/a/b/c/deep/new.py")["LastModified"].timestamp()
    assert new > max(before)
    done = m.log().count("listing changed")
    m.process.send(signal.SIGHUP)
    wait_until(lambda: m.log().count("listing changed") > done, what="the refresh")
    assert [fs.stat(p).st_mtime for p in folders] == [new] * 4


def test_a_same_bytes_upload_redates_the_file_itself_after_a_refresh(mount, s3, bucket, fs: FS, tmp_path: Path):
    """Same ETag and size, a new Last-Modified.  Before: the refresh redated
    the folders above but `stat` of the file kept the old date (older than
    its own folder) until something listed the folder or the five-minute
    attribute cache ran out, so two mounts showed the file different dates."""
    key = f"{P}/app/data.txt"
    put_many(s3, bucket, [key])
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", store=tmp_path / "store")
    path = m.file(key)
    assert fs.read(path) == key.encode()
    before = fs.stat(path).st_mtime
    time.sleep(1.1)  # Last-Modified has whole seconds
    put_many(s3, bucket, [key])  # the same bytes again
    new = s3.head_object(Bucket=bucket, Key=key)["LastModified"].timestamp()
    assert new > before
    m.process.send(signal.SIGHUP)
    wait_until(lambda: "0 changed (new dates only)" in m.log(), what="the refresh")
    assert fs.stat(path).st_mtime == new
    assert fs.stat(m.path / P / "app").st_mtime == new
    assert fs.read(path) == key.encode()
