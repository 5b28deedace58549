"""End to end: the download engine on a real mount (issue 3): streaming reads,
random access jumping the queue, If-Match pinning, resume after a crash,
prefetch, single download for many readers, bounded memory.

Small files and 64 KiB parts keep these fast; faults injected by the proxy
(delays, stalls, a replaced object) make the orderings observable without
asserting on wall-clock times.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from support.mounting import FS, on_both_clients, wait_until
from support.proxy import Fault

# Every test here on both transfer clients (the fault proxy sees the same requests).
pytestmark = [pytest.mark.fuse,
              on_both_clients]

PART = 64 * 1024
P = "models/m"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def ranges(proxy, key: str) -> list[int]:
    """Start offsets of the ranged GETs for `key`, in arrival order."""
    return [int(r["range"][6:].split("-")[0]) for r in proxy.requests("GET", key)]


def pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead: only these bytes
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@pytest.fixture
def smount(mount, tmp_path: Path):
    """Mounts whose store is a separate folder, so tests can watch it from outside."""

    def start(*args: str, **kw):  # type: ignore[no-untyped-def]
        kw.setdefault("store", tmp_path / "store")
        return mount(*args, **kw)

    return start


@pytest.fixture
def big(s3, bucket):
    data = os.urandom(32 * PART)  # 2 MiB, 32 chunks
    s3.put_object(Bucket=bucket, Key=f"{P}/big.bin", Body=data)
    return data


def test_first_bytes_are_served_before_the_file_is_complete(smount, proxy, bucket, big, fs: FS):
    key = f"{P}/big.bin"
    m = smount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "32")
    # Every chunk but the first is held back at the proxy.
    proxy.add(Fault("delay", key=key, min_offset=PART, seconds=4, times=None))
    assert fs.run(pread, m.file(key), 0, 4096) == big[:4096]
    assert not (m.store / key).exists(), "the read waited for the whole file"
    assert fs.read(m.file(key), timeout=60) == big
    wait_until((m.store / key).exists, what="publication")


def test_a_random_read_jumps_the_queue(smount, proxy, bucket, big, fs: FS):
    key = f"{P}/big.bin"
    m = smount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "1")
    proxy.add(Fault("delay", key=key, seconds=1.0, times=1))  # the sweep's first chunk is slow
    tail = 30 * PART + 100
    got: list[bytes] = []
    with open(m.file(key), "rb"):  # opening starts the download at chunk 0
        wait_until(lambda: proxy.count("GET", key) >= 1, what="the first GET")
        got.append(fs.run(pread, m.file(key), tail, 4096))
    assert got[0] == big[tail:tail + 4096]
    order = ranges(proxy, key)
    assert order[0] == 0
    assert order[1] == 30 * PART, f"chunk 30 was demanded but the order was {order[:5]}"
    wait_until((m.store / key).exists, what="publication")
    assert sorted(ranges(proxy, key)) == [i * PART for i in range(32)], "every chunk fetched exactly once"


def test_an_object_replaced_mid_download_is_never_stitched(smount, proxy, bucket, big, s3, fs: FS):
    import base64

    key = f"{P}/big.bin"
    new = os.urandom(len(big))
    m = smount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "1")
    # Just before the 3rd ranged GET, the object is overwritten in S3.
    proxy.add(Fault("replace", key=key, skip=2, times=1, body_b64=base64.b64encode(new).decode()))
    with pytest.raises(OSError) as info:
        fs.read(m.file(key))
    assert info.value.errno == errno.ESTALE
    assert any(r["status"] == 412 for r in proxy.requests("GET", key)), "If-Match was not sent"
    assert "changed in the object store" in m.log()

    def reads_new() -> bool:
        try:
            return fs.read(m.file(key)) == new
        except OSError:
            return False

    wait_until(reads_new, timeout=30, what="the new version to be served")
    wait_until((m.store / key).exists, what="publication")
    assert sha((m.store / key).read_bytes()) == sha(new)


def test_a_killed_download_resumes_from_the_chunks_on_disk(smount, proxy, bucket, big, fs: FS):
    key = f"{P}/big.bin"
    args = ("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "2")
    m = smount(*args)
    proxy.add(Fault("stall", key=key, min_offset=16 * PART, seconds=60, times=None))
    assert fs.run(pread, m.file(key), 0, 8 * PART) == big[:8 * PART]
    wait_until(lambda: any((m.store / ".lazyfs" / "tmp").glob("*.json")), what="a recorded download state")
    time.sleep(1.5)  # the state is written at most once a second
    m.process.kill()
    proxy.clear()
    m2 = smount(*args, mountpoint=m.path)
    assert sha(fs.read(m2.file(key), timeout=60)) == sha(big)
    refetched = set(ranges(proxy, key))
    assert 0 not in refetched and len(refetched) < 32, f"resume fetched {len(refetched)} chunks again"
    assert "resuming download" in m2.log()
    wait_until((m2.store / key).exists, what="publication")
    assert sha((m2.store / key).read_bytes()) == sha(big)
    tmp = m2.store / ".lazyfs" / "tmp"
    wait_until(lambda: not [p.name for p in tmp.iterdir() if p.suffix in (".part", ".json")],
               what="the published download's files to leave .lazyfs/tmp")


def test_many_readers_one_download(smount, proxy, bucket, big, fs: FS):
    key = f"{P}/big.bin"
    m = smount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB")
    fs.stat(m.file(key))
    barrier = threading.Barrier(4)

    def reader() -> str:
        barrier.wait(10)
        return sha(m.file(key).read_bytes())

    results = [fs.start(reader) for _ in range(4)]
    assert {r.result(timeout=60) for r in results} == {sha(big)}
    assert sorted(ranges(proxy, key)) == [i * PART for i in range(32)]
    assert proxy.bytes_sent(key) == len(big)


def test_prefetch_fetches_everything_at_mount(smount, proxy, bucket, s3, fs: FS):
    files = {f"{P}/shard-{i}.bin": os.urandom(100_000 + i) for i in range(5)}
    files[f"{P}/config.json"] = b"{}"
    for k, v in files.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    m = smount("--prefix", f"s3://{bucket}/{P}", "--prefetch")
    for k in files:
        wait_until(lambda k=k: (m.store / k).exists(), what=f"{k} to be prefetched")
    assert "prefetch done: 6 of 6 files" in wait_until(
        lambda: m.log() if "prefetch done" in m.log() else "", what="the prefetch summary")
    gets = proxy.count("GET")
    for k, v in files.items():
        assert fs.read(m.file(k)) == v
    assert proxy.count("GET") == gets, "prefetched files were downloaded again"


def test_prefetch_glob_and_readers_go_first(smount, proxy, bucket, s3, fs: FS):
    files = {f"{P}/w{i:02d}.bin": os.urandom(2 * PART) for i in range(6)}
    files[f"{P}/notes.txt"] = b"not prefetched"
    for k, v in files.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    proxy.add(Fault("delay", seconds=0.3, times=None))  # every GET is slow, as over a WAN
    m = smount("--prefix", f"s3://{bucket}/{P}", "--prefetch-glob", "*.bin", "--part-size", "64KiB",
              "--max-connections", "1")
    wait_until(lambda: proxy.count("GET") >= 1, what="the prefetch to start")
    last = f"{P}/w05.bin"
    assert fs.read(m.file(last), timeout=60) == files[last]
    order = [r["key"] for r in proxy.requests("GET")]
    first_for_last = order.index(last)
    assert first_for_last <= 3, f"the file being read waited behind the prefetch queue: {order[:8]}"
    wait_until(lambda: all((m.store / k).exists() for k in files if k.endswith(".bin")), timeout=60,
               what="the prefetch to finish")
    assert not (m.store / f"{P}/notes.txt").exists()


def test_memory_stays_bounded_while_streaming(smount, proxy, bucket, s3, fs: FS):
    key = f"{P}/large.bin"
    data = os.urandom(96 * 1024 * 1024)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    m = smount("--prefix", f"s3://{bucket}/{P}")
    assert sha(fs.read(m.file(key), timeout=120)) == sha(data)
    status = Path(f"/proc/{m.process.pid}/status").read_text()
    hwm_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    # Python, boto3 and the engine take about 80 MiB; the file must not add to it.
    assert hwm_kib < 150 * 1024, f"peak RSS {hwm_kib // 1024} MiB while streaming 96 MiB"


def test_opening_a_known_path_does_not_wait_for_the_whole_listing(smount, proxy, bucket, s3, fs: FS):
    # More than the start-up check's first page (100 keys): a listing of its own.
    for i in range(120):
        s3.put_object(Bucket=bucket, Key=f"{P}/many/d{i:03d}/f.bin", Body=b"x")
    key = f"{P}/llm/weights/model.bin"
    s3.put_object(Bucket=bucket, Key=key, Body=b"w" * 5000)
    # The full listing (its requests list the whole folder; a lookup's only
    # its own name, the start-up probe one key) is held back; lookups are not.
    proxy.add(Fault("delay", method="GET", query={"prefix": f"{P}/", "max-keys": "1000"}, seconds=2, times=None))
    m = smount("--prefix", f"s3://{bucket}/{P}")
    assert "still listing" in m.process.stdout_lines[0], "the ready line says the listing goes on"
    assert fs.read(m.file(key), timeout=1.9) == b"w" * 5000
    assert "listed" not in m.log(), "the open waited for the full listing"
    with pytest.raises(FileNotFoundError):
        fs.stat(m.file(f"{P}/llm/missing.bin"))
    wait_until(lambda: "listed 121 objects" in m.log(), timeout=60, what="the full listing")
    assert len(fs.listdir(m.path / P / "many")) == 120


def test_after_an_object_is_replaced_mid_download_the_next_open_reads_the_new_version(
        smount, proxy, bucket, big, fs: FS):
    """Issue 11.3: the open handle of the old version gets ESTALE; the very
    next open of the path (no retry, no refresh: --refresh 0) reads the new
    version whole, and nothing of the old one is published."""
    import base64

    key = f"{P}/big.bin"
    new = os.urandom(len(big) + 4096)  # another size too: the kernel's cached size must not clip it
    m = smount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "1",
               "--refresh", "0")
    proxy.add(Fault("replace", key=key, skip=2, times=1, body_b64=base64.b64encode(new).decode()))
    with pytest.raises(OSError) as info:
        fs.read(m.file(key))
    assert info.value.errno == errno.ESTALE
    assert fs.read(m.file(key)) == new
    assert fs.stat(m.file(key)).st_size == len(new)
    wait_until((m.store / key).exists, what="publication")
    assert sha((m.store / key).read_bytes()) == sha(new)
    assert proxy.count("LIST") <= 2, "a full listing was needed to find the new version"


def test_opening_a_models_config_fetches_its_small_files_not_its_shards(smount, proxy, bucket, s3, fs: FS):
    """Issue 13.6: model servers read config.json, then the tokenizer, the
    generation config and the index, a round trip each; opening the config
    fetches them at once.  Not the shards, not weights of other formats, not
    the files of a folder that holds no model, and nothing with
    --no-model-readahead."""
    config, tokenizer, index = f"{P}/config.json", f"{P}/tokenizer.json", f"{P}/model.safetensors.index.json"
    shard, app_config, asset = f"{P}/model-00001-of-00001.safetensors", f"{P}/app/config.json", f"{P}/app/a.json"
    other_weights = f"{P}/pytorch_model.bin"
    files = {config: b'{"layers": 2}', tokenizer: os.urandom(5 * PART + 7), index: b'{"weight_map": {}}',
             shard: os.urandom(8 * PART), other_weights: os.urandom(3000), app_config: b"{}", asset: b"[]"}
    for k, v in files.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    m = smount("--prefix", f"s3://{bucket}/{P}")
    assert fs.read(m.file(config)) == files[config]
    for key in (tokenizer, index):
        wait_until((m.store / key).exists, what=f"{key} fetched with the config")
    gets = proxy.count("GET", tokenizer)
    assert fs.read(m.file(tokenizer)) == files[tokenizer]
    assert proxy.count("GET", tokenizer) == gets, "the tokenizer fetched ahead was downloaded again"
    assert fs.read(m.file(app_config)) == files[app_config]
    time.sleep(0.5)
    assert proxy.count("GET", shard) == 0 and proxy.count("GET", other_weights) == 0
    assert proxy.count("GET", asset) == 0, "a folder without a model has no companions"
    m.stop()

    proxy.clear()
    m = smount("--prefix", f"s3://{bucket}/{P}", "--no-model-readahead", store=m.store.parent / "store2")
    assert fs.read(m.file(config)) == files[config]
    time.sleep(0.5)
    assert proxy.count("GET", tokenizer) == 0 and proxy.count("GET", index) == 0


def test_a_files_first_request_is_one_block_where_the_client_hands_over_whole_requests(
        smount, proxy, bucket, s3, fs: FS, transfer_client: str):
    """The CRT's client hands a request's bytes over only once all of them
    are in: a reader of a file's header must not wait for a whole part
    (8 MiB by default) to arrive, so there the first request is one block.
    boto3 hands over the first 64 KiB of any request: the sweep's first is a
    whole part, unless the reader's own demand (its block and the next) was
    claimed before the sweep ran, as on a loaded machine; either starts at 0."""
    key = f"{P}/weights.bin"
    data = os.urandom(4 * 1024 * 1024)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    m = smount("--prefix", f"s3://{bucket}/{P}")
    assert fs.run(pread, m.file(key), 0, 4096) == data[:4096]
    first = proxy.requests("GET", key)[0]
    if transfer_client == "crt":
        assert first["range"] == "bytes=0-1048575", first
    else:
        assert first["range"] == "" or first["range"].startswith("bytes=0-"), first
    assert fs.read(m.file(key)) == data


def test_a_shard_read_through_starts_the_next_one_a_few_tensors_do_not(smount, proxy, bucket, s3, fs: FS):
    """Issue 13.6 on a real mount: a loader reading shard 1 through finds
    shard 2 on its way; a reader of a few bytes of shard 1 sends nothing
    for shard 2 (the fs bench's mmap scenario paid for it before)."""
    shards = {f"{P}/model-0000{i}-of-00002.safetensors": os.urandom(16 * PART) for i in (1, 2)}
    for k, v in shards.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    first, second = sorted(shards)
    m = smount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB")
    assert fs.run(pread, m.file(first), 5 * PART, 4096) == shards[first][5 * PART:5 * PART + 4096]
    wait_until((m.store / first).exists, what="the first shard's publication")
    time.sleep(0.5)
    assert proxy.count("GET", second) == 0, "a reader of a few bytes of shard 1 started shard 2"

    assert fs.read(m.file(first)) == shards[first]  # read through, from the store copy
    wait_until((m.store / second).exists, what="the next shard fetched ahead")
    gets = proxy.count("GET", second)
    assert fs.read(m.file(second)) == shards[second]
    assert proxy.count("GET", second) == gets, "the shard fetched ahead was downloaded again"


# A slow link, per connection: a block lands within the read deadline below, a part of several blocks does not.
SLOW_RATE = 400_000
SLOW_DEADLINE = 6.0


def test_a_reader_on_a_slow_link_waits_as_long_as_its_file_keeps_arriving(smount, proxy, bucket, s3, fs: FS,
                                                                           transfer_client: str):
    """Bytes of the file land every few seconds, but a part of several blocks
    takes longer than --read-deadline.  The CRT's client hands a request's
    bytes over only once all of them are in, so a reader waiting for a block
    inside such a part got EIO while the file was arriving (boto3 hands over
    each block as it lands).  Its requests are now sized from the rate the
    file's first block came at: one block each on this link."""
    block, key = 1024 * 1024, f"{P}/slow.bin"
    assert block / SLOW_RATE < SLOW_DEADLINE / 2 and 4 * block / SLOW_RATE > SLOW_DEADLINE * 1.5
    data = os.urandom(5 * block)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    proxy.add(Fault("throttle", key=key, rate=SLOW_RATE, times=None))
    m = smount("--prefix", f"s3://{bucket}/{P}", "--read-deadline", f"{SLOW_DEADLINE:g}")
    assert fs.read(m.file(key), timeout=90) == data
    gets = proxy.requests("GET", key)
    assert all(r["fault"] == "throttle" for r in gets)
    if transfer_client == "crt":  # (boto3: one request, each block handed over as it lands)
        assert all(r["body_bytes"] <= block for r in gets), [r["range"] for r in gets]
