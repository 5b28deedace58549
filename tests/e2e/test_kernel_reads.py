"""End to end: FUSE passthrough (passthrough.py).  A file whose local copy is
complete is read and mapped by the kernel from the store file: the daemon
serves none of its bytes.  A file opened while it downloaded stays served by
lazyfs until that handle closes (the kernel refuses mixing the two), and
--no-passthrough serves everything through lazyfs.  The shards of a
checkpoint a loader walks are opened whole (--whole-file-open), so they pass
through too.  A big file read as it downloads skips the mount's page cache
(direct_io), unless --no-direct-io."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from lazyfs.fuse_ops import DIRECT_IO_FROM
from lazyfs.passthrough import kernel_passes_through
from support.mounting import FS, wait_until
from support.pagecache import KERNEL_CACHES
from support.proxy import Fault
from support.s3server import free_port

# Re-reads the page cache answers: never beside a drop of the kernel's caches.
pytestmark = [pytest.mark.fuse, KERNEL_CACHES]

P = "models/m"
KEY = f"{P}/model.safetensors"
PART = 256 * 1024


def stats(fs: FS, m) -> dict:
    return json.loads(fs.read(m.path / ".lazyfs" / "stats.json"))


def state(fs: FS, m, key: str) -> str:
    return fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.state").decode()


def mapped(path: Path) -> bytes:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        return bytes(mm)


def uncached_read(path: Path) -> bytes:
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.read()


@pytest.fixture
def passthrough_ok() -> None:
    """Skips where the kernel (before 6.9) or pyfuse3 cannot pass through;
    CI's setup builds the pyfuse3 that can (scripts/native/build-pyfuse3)."""
    import pyfuse3

    if not kernel_passes_through():
        pytest.skip(f"Linux {os.uname().release} has no FUSE passthrough")
    if hasattr(pyfuse3, "passthrough_open"):
        return
    if os.environ.get("CI"):
        pytest.fail("CI must run with the passthrough pyfuse3 (scripts/setup builds it)")
    pytest.skip("this pyfuse3 has no passthrough")


def test_a_restart_reads_and_maps_the_store_without_a_request(passthrough_ok, mount, proxy, s3, bucket,
                                                            fs: FS, tmp_path: Path):
    # Two shards of a checkpoint: with both on disk, nothing needs to see the
    # first one read through (which would start the second), so it passes too.
    data = os.urandom(8 * PART + 123)
    shard1, shard2 = f"{P}/model-00001-of-00002.safetensors", f"{P}/model-00002-of-00002.safetensors"
    s3.put_object(Bucket=bucket, Key=shard1, Body=data)
    s3.put_object(Bucket=bucket, Key=shard2, Body=data[::-1])
    store = tmp_path / "store"
    m1 = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", store=store)
    assert fs.read(m1.file(shard1)) == data and fs.read(m1.file(shard2)) == data[::-1]
    wait_until(lambda: state(fs, m1, shard1) == state(fs, m1, shard2) == "cached", what="the copies published")
    assert m1.stop() == 0
    gets = proxy.count("GET")

    port = free_port()
    m2 = mount("--prefix", f"s3://{bucket}/{P}", "--metrics-port", str(port), store=store)
    assert fs.run(uncached_read, m2.file(shard1)) == data
    assert fs.run(mapped, m2.file(shard1)) == data
    assert fs.run(mapped, m2.file(shard2)) == data[::-1]
    with open(m2.file(shard1), "rb") as f:  # random reads, the tail
        assert fs.run(os.pread, f.fileno(), 4096, 3 * PART + 5) == data[3 * PART + 5:3 * PART + 4101]
        assert fs.run(os.pread, f.fileno(), 1000, len(data) - 100) == data[-100:]
    s = stats(fs, m2)
    assert s["cache"]["hits"] == 4 and s["cache"]["passthrough_opens"] == 4
    assert s["cache"]["served_bytes"]["cached"] == 0, "the daemon served bytes the kernel should have read"
    assert proxy.count("GET") == gets, "a restart over a complete store downloads nothing"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "lazyfs_passthrough_opens_total 4.0" in metrics.splitlines()
    assert fs.stat(m2.file(shard1)).st_size == len(data)


def test_a_file_opened_while_it_downloads_is_served_by_lazyfs_until_that_handle_closes(
        passthrough_ok, mount, s3, bucket, fs: FS, tmp_path: Path):
    data = os.urandom(8 * PART)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", store=tmp_path / "store")
    early = fs.run(os.open, str(m.file(KEY)), os.O_RDONLY)
    try:
        early_map = fs.run(mmap.mmap, early, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        assert fs.run(bytes, early_map) == data  # read through the download
        wait_until(lambda: state(fs, m, KEY) == "cached", what="the copy published")
        # Complete now, but the inode is open through the page cache: a
        # passthrough open of it would fail in the kernel (EIO).
        assert fs.run(uncached_read, m.file(KEY)) == data
        assert stats(fs, m)["cache"]["passthrough_opens"] == 0
        early_map.close()
    finally:
        fs.run(os.close, early)
    wait_until(lambda: fs.run(mapped, m.file(KEY)) == data and stats(fs, m)["cache"]["passthrough_opens"] >= 1,
               what="an open after the last cached handle closed to pass through")


@pytest.fixture
def direct_io_ok() -> None:
    """Skips where pyfuse3 cannot ask the kernel to map direct_io handles
    (then lazyfs never opens one); CI's setup builds the pyfuse3 that can."""
    import pyfuse3

    if hasattr(pyfuse3, "direct_io_allows_mmap"):
        return
    if os.environ.get("CI"):
        pytest.fail("CI must run with the pyfuse3 of scripts/native/build-pyfuse3 (scripts/setup builds it)")
    pytest.skip("this pyfuse3 cannot ask for mappings of direct_io handles")


def served_again(fs: FS, m, fd: int, off: int, size: int, want: bytes) -> int:
    """Read [off, off + size) again; the bytes lazyfs served for it (0 when
    the mount's page cache answered).  First the kernel's readahead after the
    earlier read must have landed: its replies count as served too.  The
    least of two re-reads: a readahead still waiting for its block when the
    served count held still, or one a re-read sets off past the range (the
    kernel's async marker), lands in one re-read's count, not in both; where
    every read reaches lazyfs (direct_io), both serve the whole range."""
    def served() -> int:
        return stats(fs, m)["cache"]["served_bytes"]["s3"]

    def once() -> int:
        seen = [served()]

        def settled() -> bool:
            time.sleep(0.3)
            seen.append(served())
            return seen[-1] == seen[-2]

        wait_until(settled, what="the readahead after the earlier read to land")
        before = seen[-1]
        assert fs.run(os.pread, fd, size, off) == want
        return served() - before

    return min(once(), once())


@pytest.mark.parametrize("flag", ["", "--no-direct-io"])
def test_a_big_file_read_as_it_downloads_skips_the_page_cache(direct_io_ok, mount, s3, bucket, fs: FS,
                                                              tmp_path: Path, flag: str):
    data, small = os.urandom(DIRECT_IO_FROM + 4097), os.urandom(4 * PART)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    s3.put_object(Bucket=bucket, Key=f"{P}/tokenizer.json", Body=small)
    port = free_port()
    m = mount("--prefix", f"s3://{bucket}/{P}", "--metrics-port", str(port), *([flag] if flag else []),
              store=tmp_path / "store")
    fd = fs.run(os.open, str(m.file(KEY)), os.O_RDONLY)
    try:
        assert fs.run(os.pread, fd, 1 << 20, 0) == data[:1 << 20]
        # direct_io: every read reaches lazyfs, this one too, which the page cache would have answered.
        assert served_again(fs, m, fd, 0, 1 << 20, data[:1 << 20]) == (0 if flag else 1 << 20)
        with fs.run(mmap.mmap, fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as mm:  # a shared mapping of it works
            assert fs.run(bytes, mm) == data
        assert fs.run(os.pread, fd, 10_000, len(data) - 5000) == data[-5000:]
    finally:
        fs.run(os.close, fd)
    fd = fs.run(os.open, str(m.file(f"{P}/tokenizer.json")), os.O_RDONLY)
    try:  # a small file: its readers read small blocks, which the page cache gathers
        assert fs.run(os.pread, fd, 4096, 0) == small[:4096]
        assert served_again(fs, m, fd, 0, 4096, small[:4096]) == 0
    finally:
        fs.run(os.close, fd)
    assert stats(fs, m)["cache"]["direct_io_opens"] == (0 if flag else 1)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f"lazyfs_direct_io_opens_total {0.0 if flag else 1.0}" in metrics.splitlines()
    if kernel_passes_through():  # the mapping put the inode in the kernel's cached mode: it left with the handle
        wait_until(lambda: state(fs, m, KEY) == "cached", what="the copy published")
        assert fs.run(mapped, m.file(KEY)) == data
        assert stats(fs, m)["cache"]["passthrough_opens"] == 1


def test_no_passthrough_serves_every_read_through_lazyfs(mount, s3, bucket, fs: FS, tmp_path: Path):
    data = os.urandom(4 * PART)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    store = tmp_path / "store"
    m1 = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m1.file(KEY)) == data
    wait_until(lambda: state(fs, m1, KEY) == "cached", what="the copy published")
    assert m1.stop() == 0
    m2 = mount("--prefix", f"s3://{bucket}/{P}", "--no-passthrough", store=store)
    assert fs.run(uncached_read, m2.file(KEY)) == data
    s = stats(fs, m2)
    assert s["cache"]["passthrough_opens"] == 0 and s["cache"]["served_bytes"]["cached"] == len(data)


def opened_whole(fs: FS, m, key: str) -> bool:
    """Open `key` and say whether, as the open returned, its copy was
    already complete (the open waited for all of it); then read it all."""
    fd = fs.run(os.open, str(m.file(key)), os.O_RDONLY)
    try:
        whole = state(fs, m, key) == "cached"
        with fs.run(mmap.mmap, fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            fs.run(bytes, mm)
    finally:
        fs.run(os.close, fd)
    return whole


@pytest.mark.parametrize("mode", ["checkpoint", "always", "never"])
def test_which_opens_wait_for_the_whole_file(passthrough_ok, mount, proxy, s3, bucket, fs: FS, tmp_path: Path,
                                             mode: str):
    """By default (checkpoint) an open waits for a whole file only for the
    shards of a checkpoint whose index the loader opened; a reader of a
    lone file gets its first bytes as they arrive.  Every byte after the
    first part arrives late here, so a read-through open returns while the
    file still downloads."""
    shards = [f"{P}/model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    lone = f"{P}/other/model-00001-of-00002.safetensors"  # a shard name, but no index beside it
    data = {key: os.urandom(8 * PART + i) for i, key in enumerate([*shards, lone])}
    index = f"{P}/model.safetensors.index.json"
    data[index] = json.dumps({"weight_map": {"w": shards[0]}}).encode()
    for key, body in data.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    proxy.add(Fault("delay", min_offset=PART, seconds=1.0, times=None))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", "--whole-file-open", mode,
              store=tmp_path / "store")
    assert opened_whole(fs, m, lone) is (mode == "always")
    assert fs.read(m.file(index)) == data[index]
    before = stats(fs, m)["cache"]
    waited = [opened_whole(fs, m, key) for key in shards]
    after = stats(fs, m)["cache"]
    assert waited == [mode != "never"] * 3
    if mode != "never":  # the kernel read every shard from the store: lazyfs served none of it
        assert after["served_bytes"]["s3"] == before["served_bytes"]["s3"]
        assert after["passthrough_opens"] == before["passthrough_opens"] + 3
    for key, body in data.items():  # each byte downloaded once, and right
        assert fs.read(m.file(key)) == body
        assert proxy.bytes_sent(key) == len(body), key


def read_direct(path: Path, size: int) -> bytes:
    """Read a file whole as the Run:ai streamer does: O_DIRECT, large
    requests into page-aligned memory."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        chunk = 4 * PART
        with mmap.mmap(-1, chunk) as buf:
            out = bytearray()
            while len(out) < size:
                n = os.preadv(fd, [buf], len(out))
                assert n > 0, f"EOF at {len(out)} of {size}"
                out += buf[:n]
            return bytes(out)
    finally:
        os.close(fd)


def test_an_o_direct_open_of_a_walked_shard_reads_as_the_bytes_arrive(passthrough_ok, mount, proxy, s3, bucket,
                                                                      fs: FS, tmp_path: Path):
    """The Run:ai streamer (vLLM's runai_streamer loader given a folder)
    opens every shard at once with O_DIRECT and reads in large parallel
    requests: it would gain nothing from the kernel reading a complete
    copy, and waiting for whole shards held its first tensor back.  Its
    opens return at once, as a plain reader's do, though the loader opened
    the index; a mapping open of the next shard still waits for all of it."""
    shards = [f"{P}/model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    data = {key: os.urandom(8 * PART + i * 4096) for i, key in enumerate(shards)}
    index = f"{P}/model.safetensors.index.json"
    data[index] = json.dumps({"weight_map": {"w": shards[0], "v": shards[1]}}).encode()
    for key, body in data.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    proxy.add(Fault("delay", min_offset=PART, seconds=1.0, times=None))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", store=tmp_path / "store")
    assert fs.read(m.file(index)) == data[index]
    fd = fs.run(os.open, str(m.file(shards[0])), os.O_RDONLY | os.O_DIRECT)
    try:
        assert state(fs, m, shards[0]) != "cached", "the O_DIRECT open waited for the whole shard"
    finally:
        fs.run(os.close, fd)
    assert fs.run(read_direct, m.file(shards[0]), len(data[shards[0]])) == data[shards[0]]
    assert opened_whole(fs, m, shards[1]), "a mapping open of a walked shard no longer waits"
    # Once the shard is complete, an O_DIRECT open passes through (the
    # streamer on a restart): the kernel reads the copy, lazyfs serves none.
    wait_until(lambda: state(fs, m, shards[0]) == "cached", what="the shard published")
    before = stats(fs, m)["cache"]
    assert fs.run(read_direct, m.file(shards[0]), len(data[shards[0]])) == data[shards[0]]
    after = stats(fs, m)["cache"]
    assert after["passthrough_opens"] == before["passthrough_opens"] + 1
    assert after["served_bytes"] == before["served_bytes"]
    for key, body in data.items():
        assert proxy.bytes_sent(key) == len(body), key


def test_a_whole_file_open_fetches_the_next_shard_at_once(passthrough_ok, mount, proxy, s3, bucket, fs: FS,
                                                        tmp_path: Path):
    """The kernel reads a shard opened whole without lazyfs seeing a byte,
    so its next shard cannot wait for it to be read through: it is fetched
    as the open returns, and its own open finds it on disk."""
    first, second = f"{P}/model-00001-of-00002.safetensors", f"{P}/model-00002-of-00002.safetensors"
    data = {first: os.urandom(8 * PART), second: os.urandom(8 * PART + 1)}
    for key, body in data.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", "--whole-file-open", "always",
              store=tmp_path / "store")
    fd = fs.run(os.open, str(m.file(first)), os.O_RDONLY)
    try:
        wait_until(lambda: state(fs, m, second) == "cached", what="the next shard fetched while one is open")
    finally:
        fs.run(os.close, fd)
    gets = proxy.count("GET", second)
    assert fs.read(m.file(second)) == data[second]
    assert proxy.count("GET", second) == gets
    assert stats(fs, m)["cache"]["passthrough_opens"] == 2


@pytest.mark.log_errors('download of .* failed: ')
@pytest.mark.parametrize("fault, err", [
    (Fault("status", status=503, code="SlowDown", times=None, min_offset=PART), errno.EIO),
    (Fault("status", status=403, code="AccessDenied", times=None, min_offset=PART), errno.EACCES),
], ids=["5xx-forever", "403"])
def test_a_whole_file_open_fails_as_a_read_would_and_the_mount_survives(passthrough_ok, mount, proxy, s3, bucket,
                                                                         fs: FS, tmp_path: Path, fault, err):
    """The file's first part arrives, the rest never does: the open, which
    waits for all of it, fails with the errno a reader would get."""
    data = os.urandom(8 * PART)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    fault.key = KEY
    proxy.add(fault)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", "--whole-file-open", "always",
              "--retries", "1", store=tmp_path / "store")
    with pytest.raises(OSError) as info:
        fs.run(os.open, str(m.file(KEY)), os.O_RDONLY, timeout=60)
    assert info.value.errno == err
    proxy.clear_faults()
    assert fs.read(m.file(KEY)) == data, "the mount did not recover"
    assert stats(fs, m)["cache"]["passthrough_opens"] >= 1


def test_a_whole_file_open_waits_through_a_download_started_over(passthrough_ok, mount, proxy, s3, bucket,
                                                                fs: FS, tmp_path: Path):
    """Bytes that fail verification are downloaded again into a fresh file:
    a whole-file open waits for those too, and gets the right ones."""
    data = os.urandom(8 * PART)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    proxy.add(Fault("corrupt", key=KEY, min_offset=PART, times=1))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", "--whole-file-open", "always",
              store=tmp_path / "store")
    assert opened_whole(fs, m, KEY)
    assert fs.run(mapped, m.file(KEY)) == data
    assert any(r["fault"] == "corrupt" for r in proxy.requests("GET", KEY)), "the fault never fired"
    assert "downloading it again" in m.log()


def test_a_whole_file_open_waits_as_long_as_its_file_keeps_arriving(passthrough_ok, mount, proxy, s3, bucket,
                                                                   fs: FS, tmp_path: Path):
    """On a slow link the file arrives steadily, a part a second, but all of
    it takes more than --read-deadline: the open waited for 8 MiB at a time
    within one deadline, and failed with EIO while the bytes kept coming.
    It now waits as long as bytes of the file land, and gets them all."""
    data = os.urandom(8 * PART)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    proxy.add(Fault("throttle", key=KEY, rate=PART, times=None))  # a part a second, on one connection
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", "--whole-file-open", "always",
              "--max-connections", "1", "--read-deadline", "3", store=tmp_path / "store")
    started = time.monotonic()
    assert opened_whole(fs, m, KEY)
    assert time.monotonic() - started > 3, "the file came within one deadline: the test shows nothing"
    assert fs.run(mapped, m.file(KEY)) == data
    assert all(r["fault"] == "throttle" for r in proxy.requests("GET", KEY))


def test_opening_a_checkpoints_index_fetches_its_first_shard(passthrough_ok, mount, proxy, s3, bucket, fs: FS,
                                                           tmp_path: Path):
    """Loaders open the first shard right after the index: its download
    starts with the index's open, not a round trip later; the others wait
    for their turn (each starts when the one before is opened whole)."""
    shards = [f"{P}/model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    index = f"{P}/model.safetensors.index.json"
    for key in shards:
        s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(4 * PART))
    s3.put_object(Bucket=bucket, Key=index, Body=b'{"weight_map": {}}')
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", store=tmp_path / "store")
    assert fs.read(m.file(index)) == b'{"weight_map": {}}'
    wait_until(lambda: state(fs, m, shards[0]) == "cached", what="the first shard fetched with the index")
    assert proxy.count("GET", shards[1]) == 0, "a later shard was fetched before its turn"


def served(fs: FS, m) -> int:
    return sum(stats(fs, m)["cache"]["served_bytes"].values())


def test_an_unrelated_refresh_keeps_a_files_inode_and_its_cached_pages(mount, s3, bucket, fs: FS, tmp_path: Path):
    """An object added beside a file changes nothing about the file: after the
    refresh it keeps its inode, and the kernel its pages (--no-passthrough:
    every read the page cache misses is one lazyfs serves and counts)."""
    data = os.urandom(4 * PART)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--no-passthrough", "--refresh", "0", store=tmp_path / "store")
    assert fs.read(m.file(KEY)) == data
    wait_until(lambda: state(fs, m, KEY) == "cached", what="the copy published")
    ino, before = fs.stat(m.file(KEY)).st_ino, served(fs, m)
    assert fs.read(m.file(KEY)) == data
    assert served(fs, m) == before, "a re-read was not served by the page cache"
    s3.put_object(Bucket=bucket, Key=f"{P}/other.bin", Body=b"unrelated")
    changes = m.log().count("listing changed")
    m.process.send(signal.SIGHUP)
    wait_until(lambda: m.log().count("listing changed") > changes, what="the refresh")
    assert fs.listdir(m.path / P) == ["model.safetensors", "other.bin"]
    assert fs.stat(m.file(KEY)).st_ino == ino, "an unchanged file was renumbered"
    assert fs.read(m.file(KEY)) == data
    assert served(fs, m) == before, "the unchanged file's cached pages were dropped"


def test_a_checkpoint_larger_than_the_cache_budget_is_downloaded_once(passthrough_ok, mount, proxy, s3, bucket,
                                                                     fs: FS, tmp_path: Path):
    """--cache-max-size below two shards: a loader opens the index, then maps
    each shard whole and closes it.  Each shard is downloaded once (a shard
    was evicted as it was published for the open waiting for it, and the
    next one fetched ahead evicted the one being read: the model came 2.3
    times), and with nothing open the budget counts what the store holds,
    within the budget."""
    shards = {f"{P}/model-0000{i}-of-00003.safetensors": os.urandom(16 * PART) for i in (1, 2, 3)}
    index = f"{P}/model.safetensors.index.json"
    for key, data in shards.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    s3.put_object(Bucket=bucket, Key=index, Body=b'{"weight_map": {}}')
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "256KiB", "--cache-max-size", "6MiB", store=store)
    assert fs.read(m.file(index)) == b'{"weight_map": {}}'
    for key, data in shards.items():
        assert fs.run(mapped, m.file(key)) == data
    assert {key: proxy.bytes_sent(key) for key in shards} == {key: 16 * PART for key in shards}, \
        "a shard was downloaded twice"
    kept = sum(p.stat().st_size for p in (store / P).iterdir() if p.is_file())
    wait_until(lambda: stats(fs, m)["cache"]["budget"]["used_bytes"] == kept, what="the budget to count the store")
    assert kept <= 6 * 2**20
