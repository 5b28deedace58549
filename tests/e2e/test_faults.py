"""End to end (issue 5): every fault injected for real through the proxy, or
on the local disk, with the outcome a reader sees and what the mount logs."""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazyfs.completion import ASK_FOR_A_CHECKSUM_FROM
from support.mounting import FS, on_both_clients, wait_until
from support.proxy import Fault
from support.s3server import s3_client

# Every test here on both transfer clients (the fault proxy sees the same requests).
pytestmark = [pytest.mark.fuse,
              on_both_clients]

P = "models/m"
PART = 64 * 1024
FAST = ("--retries", "2", "--read-timeout", "1", "--read-deadline", "20")
# For tests of a failing HEAD: the GETs meet no fault, and a 1 s read timeout would make a loaded
# machine's slow part (the CRT hands a part over whole) a stall that fails the download.
HEAD_FAULTS = ("--retries", "2", "--read-deadline", "20")


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def obj(s3, bucket):
    data = os.urandom(6 * PART + 123)
    s3.put_object(Bucket=bucket, Key=f"{P}/w.bin", Body=data)
    return f"{P}/w.bin", data


@pytest.fixture
def fmount(mount, tmp_path: Path, bucket):
    """A mount of the test folder with small parts and short timeouts."""

    def start(*extra: str, **kw):  # type: ignore[no-untyped-def]
        kw.setdefault("store", tmp_path / "store")
        return mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", *FAST, *extra, **kw)

    return start


@pytest.mark.parametrize("fault", [
    Fault("status", status=503, code="SlowDown", times=3),
    Fault("status", status=500, code="InternalError", times=2),
    Fault("reset", after=20_000, times=2),
    Fault("short", after=10_000, times=2),
    Fault("stall", after=5_000, seconds=5, times=1),
    Fault("stall", after=0, seconds=5, times=1),
    Fault("delay", seconds=5, times=1),  # no response headers within --read-timeout
], ids=["503-slowdown", "500", "reset-mid-body", "short-body", "stall-mid-body", "stall-no-bytes", "stall-no-headers"])
def test_transient_faults_are_retried_and_the_bytes_are_right(fmount, proxy, obj, fs: FS, fault: Fault):
    key, data = obj
    fault.key = key
    proxy.add(fault)
    m = fmount()
    assert sha(fs.read(m.file(key), timeout=30)) == sha(data)
    assert any(r["fault"] == fault.kind for r in proxy.requests("GET", key)), "the fault never fired"
    assert "Traceback" not in m.log()


@pytest.mark.log_errors('download of .* failed: ')
@pytest.mark.parametrize("fault, err", [
    (Fault("status", status=503, code="SlowDown", times=None), errno.EIO),
    (Fault("reset", after=1000, times=None), errno.EIO),
    (Fault("stall", after=0, seconds=30, times=None), errno.EIO),
    (Fault("status", status=403, code="AccessDenied", times=None), errno.EACCES),
], ids=["5xx-forever", "resets-forever", "stalls-forever", "403"])
def test_persistent_faults_fail_in_bounded_time_and_the_mount_survives(fmount, proxy, obj, bucket, fs: FS, fault,
                                                                        err):
    key, data = obj
    fault.key = key
    proxy.add(fault)
    m = fmount()
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        fs.read(m.file(key), timeout=60)
    assert info.value.errno == err
    assert time.monotonic() - started < 40, "the reader waited without bound"
    # --retries 2: three attempts of a range per download, the client's
    # retries and lazyfs's together (a 5xx the CRT had retried was retried
    # again: 3 x 3); the kernel's retry of the failed page may start one more.
    tries = collections.Counter(r["range"] for r in proxy.requests("GET", key))
    assert max(tries.values()) <= 2 * 3, f"retried more than --retries says: {tries}"
    # (A refusal is logged at WARNING: the bucket's policy or the credentials, not lazyfs failing.)
    failures = [ln for ln in m.log().splitlines() if (" ERROR " in ln or " WARNING " in ln) and key in ln]
    assert failures and all("testing" not in ln for ln in failures), "credentials in a log line"
    # The download's line names the file once, with the cause (the error's own text named it again).
    downloads = [ln for ln in failures if "download of" in ln]
    assert downloads and all(ln.count(key) == 1 and f'download of "s3://{bucket}/{key}" failed: ' in ln
                             for ln in downloads), downloads
    proxy.clear_faults()
    assert sha(fs.read(m.file(key), timeout=30)) == sha(data), "the mount did not recover"


@pytest.mark.log_errors('download of .* failed: ')
def test_a_body_cut_before_a_whole_piece_arrived_is_not_said_to_have_delivered_bytes(fmount, proxy, s3, bucket,
                                                                                      fs: FS):
    """Each body is reset after 1000 bytes: none reaches the file (boto3
    reads 64 KiB pieces, awscrt hands over whole parts), and the log said
    "transfer broke off after 0 bytes" while 1000 had been sent.  It says what
    is known: none of the request's bytes was written."""
    key = f"{P}/small.bin"
    s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(50_000))
    proxy.add(Fault("reset", key=key, after=1000, times=None))
    m = fmount()
    with pytest.raises(OSError) as info:
        fs.read(m.file(key), timeout=60)
    assert info.value.errno == errno.EIO
    [failed] = [ln for ln in m.log().splitlines() if "download of" in ln and "failed" in ln]
    assert "transfer broke off before any of bytes 0-49999 was written" in failed, failed
    assert "after 0 bytes" not in m.log()


# --read-deadline of the test below: long enough that the kernel's requests
# reach the daemon well within it on a loaded machine.
DEADLINE = 4.0


@pytest.mark.log_errors(r"ERROR lazyfs.fuse_ops: read: .*no data for bytes")
def test_a_stalled_read_fails_within_its_deadline_not_at_its_retries(fmount, proxy, s3, bucket, fs: FS):
    """The kernel retries a failed readahead for the page a reader needs (an
    mmap fault, twice): each retry used to wait a whole deadline of its own,
    so `dd` got EIO after 2x --read-deadline and an mmap reader SIGBUS after
    3x.  A retry for bytes a read gave up on, none of which arrived since,
    now fails at once."""
    key = f"{P}/big.bin"
    s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(16 << 20))
    proxy.add(Fault("stall", key=key, after=0, seconds=120, times=None))  # every GET of it holds its body
    m = fmount("--read-deadline", f"{DEADLINE:g}", "--read-timeout", "60")
    started = time.monotonic()
    res = fs.sh("dd", f"if={m.file(key)}", "of=/dev/null", "bs=128k", timeout=60)
    took = time.monotonic() - started
    assert res.returncode != 0 and "Input/output error" in res.stderr, res.stderr
    assert took < 1.5 * DEADLINE, f"dd got EIO after {took:.1f} s with --read-deadline {DEADLINE:g}"
    code = ("import mmap, sys\n"
            "f = open(sys.argv[1], 'rb')\n"
            "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
            "m[10_000_000]\n")
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code, str(m.file(key))], capture_output=True, timeout=60)
    took = time.monotonic() - started
    assert res.returncode == -signal.SIGBUS, (res.returncode, res.stderr[-500:])
    assert took < 1.5 * DEADLINE, f"the mmap reader got SIGBUS after {took:.1f} s with --read-deadline {DEADLINE:g}"
    assert "none has arrived since" in m.log(), "the retries did not fail at once"


def test_an_object_gone_since_the_listing_gives_enoent_and_is_dropped(fmount, proxy, obj, s3, bucket, fs: FS):
    key, _ = obj
    m = fmount()
    assert key.rsplit("/", 1)[1] in fs.listdir(m.path / P)
    s3.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(FileNotFoundError):
        fs.read(m.file(key))
    wait_until(lambda: "w.bin" not in fs.listdir(m.path / P), what="the entry to be dropped")
    assert "not found (404) during the download" in m.log()


@pytest.mark.log_errors('cannot write it to the store', 'needs .* MiB but the store')
def test_a_full_disk_gives_enospc_and_leaves_other_files_intact(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    store = tmp_path / "small-store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(store)], check=True)
    try:
        small = os.urandom(100_000)
        s3.put_object(Bucket=bucket, Key=f"{P}/small.bin", Body=small)
        big = [os.urandom(900_000 + i) for i in range(3)]
        for i, data in enumerate(big):
            s3.put_object(Bucket=bucket, Key=f"{P}/big{i}.bin", Body=data)
        s3.put_object(Bucket=bucket, Key=f"{P}/huge.bin", Body=os.urandom(3 << 20))
        m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", store=store)
        assert fs.read(m.file(f"{P}/small.bin")) == small
        wait_until((store / P / "small.bin").exists, what="publication")
        # Larger than the disk: refused before a byte is fetched.
        with pytest.raises(OSError) as info:
            fs.read(m.file(f"{P}/huge.bin"))
        assert info.value.errno == errno.ENOSPC
        assert proxy.count("GET", f"{P}/huge.bin") == 0
        # Each fits alone, not all three together: the ones that do not fit
        # beside the others are refused before a byte of them is fetched.
        results = [fs.start(lambda i=i: Path(m.file(f"{P}/big{i}.bin")).read_bytes()) for i in range(3)]
        outcomes = []
        for i, r in enumerate(results):
            try:
                outcomes.append(r.result(timeout=60) == big[i])
            except OSError as e:
                outcomes.append(e.errno)
        assert errno.ENOSPC in outcomes, outcomes
        assert all(o is True or o == errno.ENOSPC for o in outcomes), outcomes
        refused = [f"{P}/big{i}.bin" for i, o in enumerate(outcomes) if o == errno.ENOSPC]
        assert all(proxy.count("GET", key) == 0 for key in refused), outcomes
        wait_until(lambda: not list((store / ".lazyfs" / "tmp").glob("*.part")),
                   what="the failed downloads' files to be removed")
        assert (store / P / "small.bin").read_bytes() == small, "another cached file was damaged"
        assert "No space left on device" in m.log() or "MiB free" in m.log()
        assert "big" in "".join(ln for ln in m.log().splitlines() if "needs" in ln and "MiB free" in ln)
    finally:
        subprocess.run(["fusermount3", "-uz", str(tmp_path / "mnt0")], capture_output=True)
        subprocess.run(["umount", "-l", str(store)], check=False)


@pytest.fixture
def shards(s3, bucket):
    files = {f"{P}/s{i}.bin": os.urandom(12 * PART + i * 777) for i in range(4)}
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    return files


def start_reads(fs: FS, m, files) -> list:
    """Background reads of every file (to keep downloads running)."""
    return [fs.start(lambda k=k: Path(m.file(k)).read_bytes()) for k in files]


@pytest.mark.log_errors('transfer broke off')
def test_kill_9_mid_download_then_a_fresh_mount_serves_only_whole_files(fmount, proxy, shards, fs: FS,
                                                                        tmp_path: Path):
    store = tmp_path / "store"
    # Downloads stop at different points: some blocks land, the rest stall.
    for i, key in enumerate(shards):
        proxy.add(Fault("stall", key=key, min_offset=(i + 2) * PART, seconds=60, times=None))
    m = fmount("--max-connections", "8")
    start_reads(fs, m, shards)
    wait_until(lambda: len(list((store / ".lazyfs" / "tmp").glob("*.json"))) >= 3, what="recorded progress")
    time.sleep(1.2)
    m.process.kill()
    assert not any((store / k).exists() for k in shards), "a partial download was published"
    proxy.clear_faults()
    m2 = fmount(mountpoint=m.path)  # the stale mount is cleaned up at start
    assert "stale mount" in m2.log()
    for key, data in shards.items():
        assert sha(fs.read(m2.file(key), timeout=60)) == sha(data)
    for key, data in shards.items():
        wait_until(lambda k=key: (store / k).exists(), what=f"{key} published")
        assert sha((store / key).read_bytes()) == sha(data)
    assert "resuming download" in m2.log()


def test_sigterm_during_downloads_exits_0_quickly_and_leaves_nothing_torn(fmount, proxy, shards, fs: FS,
                                                                         tmp_path: Path):
    store = tmp_path / "store"
    for key in shards:
        proxy.add(Fault("stall", key=key, min_offset=3 * PART, seconds=60, times=None))
    m = fmount()
    pending = start_reads(fs, m, shards)
    wait_until(lambda: proxy.count("GET") >= 8, what="downloads in progress")
    started = time.monotonic()
    assert m.process.stop(signal.SIGTERM, timeout=15) == 0
    assert time.monotonic() - started < 8, "shutdown took too long"
    for f in pending:
        with pytest.raises(OSError) as failed:
            f.result(timeout=10)
        assert not isinstance(failed.value, TimeoutError), "a reader was left hanging"
    assert not any((store / k).exists() for k in shards)
    proxy.clear_faults()
    m2 = fmount(mountpoint=m.path)
    for key, data in shards.items():
        assert sha(fs.read(m2.file(key), timeout=60)) == sha(data)


def test_symlinks_planted_in_the_store_or_a_layer_are_never_followed(mount, proxy, s3, bucket, fs: FS,
                                                                    tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(b"S" * 1000)
    real = os.urandom(1000)
    s3.put_object(Bucket=bucket, Key=f"{P}/a.bin", Body=real)
    s3.put_object(Bucket=bucket, Key=f"{P}/sub/b.bin", Body=real)
    s3.put_object(Bucket=bucket, Key=f"{P}/c.bin", Body=real)
    store = tmp_path / "store"
    (store / P).mkdir(parents=True)
    os.symlink(secret, store / P / "a.bin")  # a file link, right size
    os.symlink(outside, store / P / "sub")  # a folder link
    layer = tmp_path / "layer"
    (layer / P).mkdir(parents=True)
    os.symlink(secret, layer / P / "c.bin")
    m = mount("--prefix", f"s3://{bucket}/{P}", "--prebaked", str(layer), store=store)
    for name in ("a.bin", "sub/b.bin", "c.bin"):
        assert fs.read(m.file(f"{P}/{name}")) == real, f"{name} was served through a symlink"
    for name in ("a.bin", "sub/b.bin"):
        wait_until(lambda n=name: (store / P / n).exists() and not (store / P / n).is_symlink(),
                   what="publication over the link")
    assert secret.read_bytes() == b"S" * 1000 and sorted(os.listdir(outside)) == ["secret.bin"]
    assert (layer / P / "c.bin").is_symlink(), "a prebaked layer was modified"
    tmp = store / ".lazyfs" / "tmp"
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o700
    for p in tmp.iterdir():
        assert not stat.S_IMODE(p.stat().st_mode) & 0o077, f"{p} is readable or writable by others"


def as_nobody(path: Path) -> str:
    """Read and then try to write `path` as user nobody (coreutils only: the
    test's own interpreter may live where nobody cannot reach)."""
    script = f'cat "{path}" | wc -c; : > "{path}"'
    res = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=20,
                         preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)))
    return res.stdout + res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_permissions_with_and_without_allow_other(mount, s3, bucket, fs: FS, tmp_path: Path):
    import shutil
    import tempfile

    s3.put_object(Bucket=bucket, Key=f"{P}/x.bin", Body=b"x" * 100)
    # Outside pytest's private tmp tree, so that "nobody" can reach it at all.
    public = Path(tempfile.mkdtemp(prefix="lazyfs-perm-"))
    public.chmod(0o755)
    request = mount.cleanup
    try:
        _check_permissions(mount, bucket, fs, public, tmp_path)
    finally:
        request()
        shutil.rmtree(public, ignore_errors=True)


def _check_permissions(mount, bucket: str, fs: FS, public: Path, tmp_path: Path) -> None:
    private = mount("--prefix", f"s3://{bucket}/{P}", mountpoint=public / "a", store=tmp_path / "sa")
    out = as_nobody(private.file(f"{P}/x.bin"))
    assert "Permission denied" in out and "Read-only" not in out, out
    shared = mount("--prefix", f"s3://{bucket}/{P}", "--allow-other", mountpoint=public / "b",
                   store=tmp_path / "sb")
    out = as_nobody(shared.file(f"{P}/x.bin"))
    assert out.splitlines()[0].strip() == "100" and "Read-only file system" in out, out
    st = fs.stat(shared.file(f"{P}/x.bin"))
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()) and stat.S_IMODE(st.st_mode) == 0o444


def test_64_concurrent_readers_over_16_files(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    import random

    files = {f"{P}/f{i:02d}.bin": os.urandom(3 * PART + i * 1000) for i in range(16)}
    for k, v in files.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", store=tmp_path / "store")
    for k in list(files)[:8]:  # half of them warm
        fs.read(m.file(k))

    def reader(n: int) -> bool:
        key = list(files)[n % 16]
        data = files[key]
        rnd = random.Random(n)
        with open(m.file(key), "rb") as f:
            if n % 2:
                return f.read() == data
            for _ in range(20):
                off = rnd.randrange(len(data))
                f.seek(off)
                if f.read(4096) != data[off:off + 4096]:
                    return False
            return True

    results = [fs.start(reader, n) for n in range(64)]
    assert all(r.result(timeout=120) for r in results)
    for k in list(files)[8:]:
        assert proxy.count("GET", k) <= 3 + 1, f"{k} downloaded more than once"


def test_two_mounts_on_one_store_fetch_each_file_once(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    key = f"{P}/shared.bin"
    data = os.urandom(16 * PART)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    store = tmp_path / "node-cache"
    proxy.add(Fault("delay", key=key, seconds=0.2, times=None))  # a slow download, so they overlap
    args = ("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "2")
    a = mount(*args, store=store)
    b = mount(*args, store=store)
    ra = fs.start(lambda: Path(a.file(key)).read_bytes())
    wait_until(lambda: proxy.count("GET", key) >= 1, what="the first download")
    rb = fs.start(lambda: Path(b.file(key)).read_bytes())
    assert sha(ra.result(timeout=60)) == sha(data) and sha(rb.result(timeout=60)) == sha(data)
    starts = sorted(int(r["range"][6:].split("-")[0]) for r in proxy.requests("GET", key))
    assert starts == [i * PART for i in range(16)], "a block was fetched twice"
    assert "another lazyfs process" in a.log() + b.log()
    wait_until((store / key).exists, what="publication")
    assert sha((store / key).read_bytes()) == sha(data)


def test_a_follower_takes_over_when_the_downloader_dies(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    key = f"{P}/big.bin"
    data = os.urandom(16 * PART)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    store = tmp_path / "node-cache"
    args = ("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "2", *FAST)
    proxy.add(Fault("stall", key=key, min_offset=6 * PART, seconds=60, times=None))
    a = mount(*args, store=store)
    fs.start(lambda: Path(a.file(key)).read_bytes())
    wait_until(lambda: any((store / ".lazyfs" / "tmp").glob("*.json")), what="the owner's progress")
    b = mount(*args, store=store)
    rb = fs.start(lambda: Path(b.file(key)).read_bytes())
    wait_until(lambda: "another lazyfs process" in b.log(), what="b to follow a")
    a.process.kill()
    proxy.clear_faults()
    assert sha(rb.result(timeout=60)) == sha(data)
    assert "continuing its download here" in b.log()


def test_a_stopped_follower_fails_its_waiting_read_at_once_and_exits(mount, proxy, s3, bucket, fs: FS,
                                                                      tmp_path: Path):
    """SIGTERM to a mount whose reader waits on another mount's download of
    the same store: the read fails at once (not at its read deadline, nor cut
    off by the grace period), and the mount exits 0.  The follower answers it
    EIO; the kernel reads a failed page once more, and that retry can meet the
    stopped mount (ECONNABORTED, or ENOTCONN once it is unmounted)."""
    key = f"{P}/big.bin"
    data = os.urandom(16 * PART)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    store = tmp_path / "node-cache"
    args = ("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "2",
            "--read-deadline", "60")
    proxy.add(Fault("stall", key=key, min_offset=6 * PART, seconds=60, times=None))
    a = mount(*args, store=store)
    fs.start(lambda: Path(a.file(key)).read_bytes())
    wait_until(lambda: any((store / ".lazyfs" / "tmp").glob("*.json")), what="the owner's progress")
    b = mount(*args, store=store)

    def pread_far(path: str) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.pread(fd, 4096, 10 * PART)
            return 0
        except OSError as e:
            return e.errno
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # ENOTCONN: the mount is gone by then

    rb = fs.start(pread_far, b.file(key))
    wait_until(lambda: "another lazyfs process" in b.log(), what="b to follow a")
    time.sleep(0.5)  # the read is waiting on a's stalled request
    assert not rb.done()
    started = time.monotonic()
    assert b.stop(timeout=15) == 0
    assert rb.result(timeout=5) in (errno.EIO, errno.ECONNABORTED, errno.ENOTCONN)
    assert time.monotonic() - started < 4.5, "the stop waited out its grace period"
    assert "still in flight" not in b.log()
    proxy.clear_faults()


def test_a_followers_far_read_is_fetched_next_by_the_downloading_mount(mount, proxy, s3, bucket, fs: FS,
                                                                        tmp_path: Path):
    """Mount b follows mount a's download of a file; a reader in b jumping far
    ahead asks a for those bytes (a want file in the store), and a fetches
    them next instead of when its sweep gets there."""
    key = f"{P}/big.bin"
    data = os.urandom(24 * PART)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    store = tmp_path / "node-cache"
    proxy.add(Fault("delay", key=key, seconds=0.2, times=None))  # the sweep: a block per 0.2 s
    args = ("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "1")
    a = mount(*args, store=store)
    b = mount(*args, store=store)
    ra = fs.start(lambda: Path(a.file(key)).read_bytes())
    wait_until(lambda: proxy.count("GET", key) >= 1, what="a's download")
    far = 20 * PART + 123

    def pread_random(path: str) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # only these bytes
            return os.pread(fd, 4096, far)
        finally:
            os.close(fd)

    assert fs.run(pread_random, b.file(key), timeout=30) == data[far:far + 4096]
    assert "another lazyfs process" in b.log(), "b downloaded it itself"
    starts = [int(r["range"][6:].split("-")[0]) // PART for r in proxy.requests("GET", key)]
    assert 20 in starts and (19 not in starts or starts.index(20) < starts.index(19)), \
        f"a fetched b's block only when its sweep got there: {starts}"
    assert sha(ra.result(timeout=60)) == sha(data)
    starts = sorted(int(r["range"][6:].split("-")[0]) for r in proxy.requests("GET", key))
    assert len(starts) == len(set(starts)), "a block was fetched twice"
    wait_until((store / key).exists, what="publication")
    wait_until(lambda: not list((store / ".lazyfs" / "tmp").glob("*.want")),
               what="the want file to go with the download's other files")


def test_a_bake_and_a_mount_on_one_store_cooperate(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    from support.mounting import lazyfs_cli

    files = {f"{P}/f{i}.bin": os.urandom(8 * PART + i) for i in range(3)}
    for k, v in files.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    store = tmp_path / "store"
    proxy.add(Fault("delay", seconds=0.15, times=None))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", "--max-connections", "2", store=store)
    readers = [fs.start(lambda k=k: Path(m.file(k)).read_bytes()) for k in files]
    wait_until(lambda: proxy.count("GET") >= 2, what="the mount's downloads")
    res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                      "--to", str(store), "--part-size", "64KiB"], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    for (k, v), r in zip(files.items(), readers, strict=False):
        assert r.result(timeout=60) == v
        assert (store / k).read_bytes() == v
    for k in files:
        starts = [int(r["range"][6:].split("-")[0]) for r in proxy.requests("GET", k) if r["range"]]
        assert len(starts) == len(set(starts)), f"{k}: a block was fetched twice"


@pytest.mark.slow
def test_start_up_does_not_grow_with_the_cache(mount, s3, bucket, fs: FS, tmp_path: Path):
    s3.put_object(Bucket=bucket, Key=f"{P}/x.bin", Body=b"x")

    def ready_seconds(store: Path) -> float:
        t = time.monotonic()
        m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
        took = time.monotonic() - t
        m.stop()
        return took

    empty = tmp_path / "empty"
    big = tmp_path / "full"
    for d in range(100):
        folder = big / P / f"d{d:03d}"
        folder.mkdir(parents=True)
        for f in range(1000):  # empty files, made in one call each (half the time of an open and a close)
            os.mknod(folder / f"f{f:04d}.bin", 0o666 | stat.S_IFREG)
    fs.sh("sync")
    base = min(ready_seconds(empty) for _ in range(2))
    full = min(ready_seconds(big) for _ in range(2))
    # No scan or hash of the store at start: a generous bound for a noisy machine.
    assert full < 2 * base + 0.5, f"ready in {full:.2f} s with 100,000 cached files vs {base:.2f} s empty"


def test_many_handles_and_downloads_stay_within_the_memory_limit(mount, proxy, s3, bucket, fs: FS,
                                                                  tmp_path: Path):
    import random

    files = {f"{P}/f{i:02d}.bin": os.urandom(4 << 20) for i in range(20)}
    for k, v in files.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    s3.put_object(Bucket=bucket, Key=f"{P}/warmup.bin", Body=os.urandom(2 << 20))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--memory-limit", "64MiB", "--part-size", "1MiB",
              store=tmp_path / "store")
    # The baseline: Python, boto3 and the engine after one download (their
    # first request and thread start-up allocate once, whatever the load).
    fs.read(m.file(f"{P}/warmup.bin"))
    time.sleep(0.5)
    status = Path(f"/proc/{m.process.pid}/status")
    base = int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmRSS"))) >> 10
    handles = [fs.run(open, m.file(k), "rb") for k in files for _ in range(15)]  # 300 open files
    try:
        rnd = random.Random(1)

        def read_some(f) -> None:
            for _ in range(4):
                f.seek(rnd.randrange(4 << 20))
                f.read(256 * 1024)

        for r in [fs.start(read_some, f) for f in handles]:
            r.result(timeout=120)
        for k, v in list(files.items())[:5]:
            assert fs.read(m.file(k)) == v
        peak = int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM"))) >> 10
        assert peak - base < 64 + 16, f"RSS grew by {peak - base} MiB with 300 handles and 20 downloads"
    finally:
        for f in handles:
            f.close()


def proc_sample(pid: int) -> tuple[int, int, int]:
    """(open descriptors, threads, RSS in KiB) of a process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    field = {line.split(":")[0]: line.split()[1] for line in status if ":" in line and len(line.split()) > 1}
    return len(os.listdir(f"/proc/{pid}/fd")), int(field["Threads"]), int(field["VmRSS"])


def test_a_failed_head_for_a_checksum_the_listing_does_not_name_leaves_the_etag_check(mount, proxy, bucket,
                                                                                      moto, fs: FS):
    """A file of completion.ASK_FOR_A_CHECKSUM_FROM or more whose listing
    names no checksum is asked for one (a HEAD), in case the store keeps it;
    a HEAD that keeps failing does not fail the download: the ETag its GETs
    carried checks it."""
    key = f"{P}/big.bin"
    data = os.urandom(ASK_FOR_A_CHECKSUM_FROM + 1000)
    s3_client(moto.endpoint, checksums=False).put_object(Bucket=bucket, Key=key, Body=data)
    proxy.add(Fault("status", method="HEAD", key=key, status=500, code="InternalError", times=None))
    m = mount("--prefix", f"s3://{bucket}/{P}", *HEAD_FAULTS)
    assert sha(fs.read(m.file(key), timeout=60)) == sha(data)
    wait_until(lambda: fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.verified") != b"", timeout=30,
               what=f"{key} to be verified")
    assert fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.verified") == b"MD5"
    assert (m.store / key).read_bytes() == data
    assert proxy.count("HEAD", key) >= 1 and "cannot ask the object store for a checksum" in m.log()


@pytest.mark.parametrize("checksums", [False, True], ids=["etag only", "checksum listed"])
def test_a_412_on_the_head_after_the_gets_leaves_the_etag_check(mount, proxy, bucket, moto, fs: FS,
                                                                checksums: bool):
    """The HEAD verification sends after the GETs (for a checksum the store
    may keep, or one the listing names that ranged GETs do not carry) is
    answered 412, as when the object was overwritten after every GET (If-Match)
    was answered: the bytes are the listed version's, checked by its ETag
    and published (the complete download was thrown away; ESTALE)."""
    key = f"{P}/big.bin"
    data = os.urandom(ASK_FOR_A_CHECKSUM_FROM + 1000)
    s3_client(moto.endpoint, checksums=checksums).put_object(Bucket=bucket, Key=key, Body=data)
    proxy.add(Fault("status", method="HEAD", key=key, status=412, code="PreconditionFailed", times=None))
    m = mount("--prefix", f"s3://{bucket}/{P}", *HEAD_FAULTS)
    assert sha(fs.read(m.file(key), timeout=60)) == sha(data)
    wait_until((m.store / key).exists, timeout=30, what=f"{key} to be published")
    assert fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.verified") == b"MD5"
    assert (m.store / key).read_bytes() == data
    assert proxy.count("HEAD", key) >= 1 and "changed in the object store" not in m.log()
