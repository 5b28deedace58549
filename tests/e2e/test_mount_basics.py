"""End to end: a real mount through the CLI against moto behind a counting proxy."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, wait_until, write_model_json
from support.mountproc import force_unmount, is_mounted
from support.proxy import Fault

pytestmark = pytest.mark.fuse

PREFIX = "download/files/from"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(s3, bucket: str, key: str, data: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=data)


@pytest.fixture
def model(s3, bucket):
    files = {
        f"{PREFIX}/llm/model.bin": os.urandom(3 * 1024 * 1024 + 17),
        f"{PREFIX}/llm/tokenizer.json": b'{"vocab": {}}',
        f"{PREFIX}/config.json": b'{"a": 1}',
    }
    for key, data in files.items():
        put(s3, bucket, key, data)
    return files


def test_listing_and_stat_make_no_download(mount, proxy, bucket, model, s3, fs: FS):
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    assert fs.listdir(m.path) == ["download"]
    assert fs.listdir(m.path / PREFIX) == ["config.json", "llm"]
    assert fs.listdir(m.path / PREFIX / "llm") == ["model.bin", "tokenizer.json"]
    for key, data in model.items():
        st = fs.stat(m.file(key))
        head = s3.head_object(Bucket=bucket, Key=key)
        assert st.st_size == len(data)
        assert st.st_mtime == head["LastModified"].timestamp()
        assert st.st_mode & 0o777 == 0o444
        assert st.st_blocks * 512 >= len(data)
    assert fs.stat(m.path / PREFIX).st_mode & 0o777 == 0o555
    ls = fs.sh("ls", "-lR", str(m.path))
    assert ls.returncode == 0 and "model.bin" in ls.stdout
    du = fs.sh("du", "-sb", str(m.path / PREFIX))
    assert int(du.stdout.split()[0]) == sum(len(d) for d in model.values())
    assert proxy.count("GET") == 0
    assert proxy.count("HEAD") == 0



def test_ready_comes_after_the_first_listing_of_a_small_folder(mount, proxy, bucket, model, fs: FS):
    """README: an `ls` or a stat right after the ready line sends no request.
    Every LIST of the folder is held back 0.1 s (within READY_WAIT_S), so a
    ready line printed before the listing would leave lookups to probe S3;
    and the start-up check's page, which holds this small folder whole, is
    its only LIST."""
    proxy.add(Fault("delay", method="GET", query={"prefix": f"{PREFIX}/"}, seconds=0.1, times=None))
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    lists = proxy.count("LIST")
    assert fs.listdir(m.path / PREFIX / "llm") == ["model.bin", "tokenizer.json"]
    for key, data in model.items():
        assert fs.stat(m.file(key)).st_size == len(data)
    assert proxy.count("LIST") == lists, "lookups after the ready line went to S3"
    assert [r["fault"] for r in proxy.requests("LIST")].count("delay") == 1, "one LIST lists the folder"


# Run in the daemon at start-up (sitecustomize): print the time the import of
# lazyfs.mount (pyfuse3, trio, the engine) is over.
_IMPORT_PROBE = """
import builtins, sys, time

_real_import = builtins.__import__

def _noting(name, globals=None, locals=None, fromlist=(), level=0):
    module = _real_import(name, globals, locals, fromlist, level)
    if name == "lazyfs" and fromlist and "mount" in fromlist:
        builtins.__import__ = _real_import
        print(f"probe: lazyfs.mount imported at {time.time():.6f}", file=sys.stderr, flush=True)
    return module

builtins.__import__ = _noting
"""


def test_the_first_listing_is_in_flight_while_the_fuse_machinery_is_imported(mount, proxy, bucket, model,
                                                                             fs: FS, tmp_path: Path):
    """startup.py: the client and the first LIST start before pyfuse3, trio
    and the engine are imported, so the LIST's round trip overlaps the
    imports (the ready line's two largest costs).  The proxy notes when the
    LIST arrives (and holds it a while): before that import was over."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_IMPORT_PROBE)
    proxy.add(Fault("delay", method="GET", query={"prefix": f"{PREFIX}/"}, seconds=0.5))
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}", env=mount.env(PYTHONPATH=str(hook)))
    imported = float(m.log().split("probe: lazyfs.mount imported at ", 1)[1].split()[0])
    (listed,) = proxy.requests("LIST")
    assert listed["at"] < imported, "the LIST went out only once the FUSE machinery was imported"
    assert fs.listdir(m.path / PREFIX / "llm") == ["model.bin", "tokenizer.json"]
    assert proxy.count("LIST") == 1


def test_first_open_fetches_and_persists_then_no_more_gets(mount, proxy, bucket, model, fs: FS):
    key = f"{PREFIX}/llm/model.bin"
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    assert sha(fs.read(m.file(key))) == sha(model[key])
    gets = proxy.count("GET", key)
    assert gets >= 1
    assert sha(fs.read(m.file(key))) == sha(model[key])
    assert proxy.count("GET", key) == gets, "second open downloaded again"
    assert m.stop() == 0
    # The store is the mountpoint's own directory: the file is there unmounted.
    assert not is_mounted(m.path)
    assert sha((m.path / key).read_bytes()) == sha(model[key])
    assert not any(p.name.endswith(".part") for p in (m.path / ".lazyfs" / "tmp").iterdir())
    # A remount on the same store serves it from disk.
    proxy.clear()
    m2 = mount("--prefix", f"s3://{bucket}/{PREFIX}", mountpoint=m.path)
    assert sha(fs.read(m2.file(key))) == sha(model[key])
    assert proxy.count("GET") == 0


def test_store_elsewhere(mount, proxy, bucket, model, fs: FS, tmp_path: Path):
    key = f"{PREFIX}/config.json"
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}", store=store)
    assert fs.read(m.file(key)) == model[key]
    wait_until((store / key).exists, what="the download to be published")
    assert (store / key).read_bytes() == model[key]


def test_prebaked_copy_with_matching_size_is_served_without_get(mount, proxy, bucket, model, fs: FS,
                                                                 tmp_path: Path):
    key = f"{PREFIX}/llm/model.bin"
    mnt = tmp_path / "cache"
    (mnt / PREFIX / "llm").mkdir(parents=True)
    (mnt / key).write_bytes(model[key])  # baked into the image by an admin
    layer = tmp_path / "layer"
    (layer / PREFIX).mkdir(parents=True)
    (layer / PREFIX / "config.json").write_bytes(model[f"{PREFIX}/config.json"])
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}", "--prebaked", str(layer), mountpoint=mnt)
    assert sha(fs.read(m.file(key))) == sha(model[key])
    assert fs.read(m.file(f"{PREFIX}/config.json")) == model[f"{PREFIX}/config.json"]
    assert proxy.count("GET") == 0
    # Only the file nobody baked is fetched.
    assert fs.read(m.file(f"{PREFIX}/llm/tokenizer.json")) == model[f"{PREFIX}/llm/tokenizer.json"]
    assert proxy.count("GET") == 1
    assert not (layer / PREFIX / "llm").exists(), "a prebaked layer must never be written"


def test_prebaked_copy_with_wrong_size_is_downloaded_again(mount, proxy, bucket, model, fs: FS, tmp_path: Path):
    key = f"{PREFIX}/llm/model.bin"
    mnt = tmp_path / "cache"
    (mnt / PREFIX / "llm").mkdir(parents=True)
    (mnt / key).write_bytes(b"old version, other size")
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}", mountpoint=mnt)
    assert sha(fs.read(m.file(key))) == sha(model[key])
    assert proxy.count("GET", key) >= 1
    # Published after its last byte is served (verified, then renamed over
    # the old copy); a stop before that would leave it for the next start.
    wait_until(lambda: fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.state") == b"cached",
               what="the new version published")
    m.stop()
    assert sha((mnt / key).read_bytes()) == sha(model[key])


def test_model_json_s3_uri_and_several_prefixes_share_one_mount(mount, proxy, s3, bucket, fs: FS,
                                                                tmp_path: Path):
    other = bucket + "-other"
    s3.create_bucket(Bucket=other)
    put(s3, bucket, "models/a/w.bin", b"A" * 1000)
    put(s3, other, "apps/b/asset.txt", b"B" * 10)
    put(s3, bucket, "plain/c.txt", b"C")
    cfg_a = write_model_json(tmp_path / "a.json", download_files_from=f"s3://{bucket}/models/a")
    cfg_b = write_model_json(tmp_path / "b.json", download_files_from=f"s3://{other}/apps/b/",
                             _comment="other keys belong to the model")
    m = mount("--config", str(cfg_a), "--config", str(cfg_b), "--prefix", "plain", "--bucket", bucket)
    assert fs.listdir(m.path) == ["apps", "models", "plain"]
    assert fs.read(m.file("models/a/w.bin")) == b"A" * 1000
    assert fs.read(m.file("apps/b/asset.txt")) == b"B" * 10
    assert fs.read(m.file("plain/c.txt")) == b"C"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_first_listing_hangs_exits_at_once(mount, proxy, bucket, model, tmp_path, sig):
    """A container stopped while its sidecar starts against a slow store: out
    in a moment, exit 0, nothing left mounted, no traceback."""
    proxy.add(Fault("delay", method="GET", seconds=20, times=None))  # every LIST too: they are GETs
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with subprocess.Popen([sys.executable, "-m", "lazyfs", "mount", str(mnt), "--prefix", f"s3://{bucket}/{PREFIX}",
                           "--endpoint-url", proxy.endpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=mount.env(), start_new_session=True) as proc:
        try:
            wait_until(lambda: proxy.count("LIST") >= 1, what="the first listing to be under way")
            proc.send_signal(sig)
            code = proc.wait(10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        err = proc.stderr.read().decode()
    assert code == 0, err
    assert "Traceback" not in err
    assert not is_mounted(mnt)


def test_default_mountpoint_comes_from_download_files_to(mount, proxy, bucket, s3, fs: FS, tmp_path: Path):
    put(s3, bucket, "m/x.bin", b"x" * 10)
    target = tmp_path / "practicus-cache"
    target.mkdir()
    cfg = write_model_json(tmp_path / "model.json", download_files_from="m",
                           download_files_to=str(target))
    # MOUNTPOINT omitted, bucket from the environment: lazyfs mount --config model.json
    with subprocess.Popen([sys.executable, "-m", "lazyfs", "mount", "--config", str(cfg),
                           "--endpoint-url", proxy.endpoint], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, env=mount.env(LAZYFS_BUCKET=bucket),
                          start_new_session=True) as proc:
        try:
            line = fs.run(proc.stdout.readline, timeout=30).decode()
            assert line.startswith("lazyfs: ready") and str(target) in line
            assert fs.read(target / "m" / "x.bin") == b"x" * 10
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(15)
            force_unmount(target)
    assert code == 0


def test_mutations_fail_with_erofs(mount, bucket, model, fs: FS):
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    d = m.path / PREFIX
    f = m.file(f"{PREFIX}/config.json")
    attempts = {
        "open for write": lambda: open(f, "r+b"),
        "create": lambda: open(d / "new.txt", "wb"),
        "mkdir": lambda: os.mkdir(d / "newdir"),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(d / "llm"),
        "rename": lambda: os.rename(f, d / "renamed.json"),
        "chmod": lambda: os.chmod(f, 0o644),
        "truncate": lambda: os.truncate(f, 0),
        "symlink": lambda: os.symlink("config.json", d / "link"),
        "link": lambda: os.link(f, d / "hard"),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
        "utime": lambda: os.utime(f, (0, 0)),
    }
    for what, fn in attempts.items():
        with pytest.raises(OSError) as info:
            fs.run(fn)
        assert info.value.errno == errno.EROFS, f"{what}: {info.value}"
    st = fs.run(os.statvfs, str(m.path))
    assert st.f_blocks > 0 and st.f_namemax == 255
    # What a read-only filesystem allows or refuses as a local one does: an append
    # that asks no write access reads; a name longer than f_namemax is too long.
    fd = fs.run(os.open, str(f), os.O_RDONLY | os.O_APPEND)
    try:
        assert fs.run(os.pread, fd, 64, 0) == model[f"{PREFIX}/config.json"][:64]
    finally:
        os.close(fd)
    for call in (os.stat, lambda p: os.open(p, os.O_RDONLY)):
        with pytest.raises(OSError) as info:
            fs.run(call, str(d / ("x" * 256)))
        assert info.value.errno == errno.ENAMETOOLONG, info.value
    df = fs.sh("df", str(m.path))
    assert df.returncode == 0 and "lazyfs" in df.stdout


MMAP_PROBE = """
import hashlib, json, mmap, sys
with open(sys.argv[1], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
    offsets = [int(o) for o in sys.argv[2:]]
    print(json.dumps({"slices": [hashlib.sha256(mm[o:o + 4096]).hexdigest() for o in offsets],
                      "whole": hashlib.sha256(mm[:]).hexdigest()}))
"""


def test_mmap_reads_match(mount, bucket, model, fs: FS):
    key = f"{PREFIX}/llm/model.bin"
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    data = model[key]
    offsets = [len(data) - 4096, 1 << 20, 0, 12345]
    out = json.loads(fs.python(MMAP_PROBE, str(m.file(key)), *map(str, offsets)))
    assert out["slices"] == [sha(data[o:o + 4096]) for o in offsets]
    assert out["whole"] == sha(data)


def test_concurrent_first_opens_share_one_download(mount, proxy, bucket, s3, fs: FS):
    key = f"{PREFIX}/shared.bin"
    data = os.urandom(2 * 1024 * 1024)
    put(s3, bucket, key, data)
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    fs.stat(m.file(key))
    barrier = threading.Barrier(8)

    def reader() -> str:
        barrier.wait(10)
        with open(m.file(key), "rb") as f:
            return sha(f.read())

    futures = [fs.start(reader) for _ in range(8)]
    assert {f.result(timeout=30) for f in futures} == {sha(data)}
    # One download: every byte asked for once (in one GET, or on the CRT
    # client a first block and then the rest).
    spans = sorted((int(first or 0), int(last or len(data) - 1))  # no Range, or "bytes=0-": the whole file
                   for first, _, last in (r["range"][6:].partition("-") for r in proxy.requests("GET", key)))
    assert spans[0][0] == 0 and spans[-1][1] == len(data) - 1, spans
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(spans)), f"bytes asked for twice: {spans}"


def test_unsafe_keys_are_skipped_and_never_escape_the_store(mount, proxy, bucket, s3, fs: FS, tmp_path: Path):
    good = f"{PREFIX}/good.txt"
    bad = [f"{PREFIX}/../escape.txt", f"{PREFIX}/./dot.txt", f"{PREFIX}//double.txt",
           f"{PREFIX}/" + "n" * 256, f"{PREFIX}/ctl\x01name", f"{PREFIX}/both", f"{PREFIX}/trail/"]
    put(s3, bucket, good, b"good")
    for key in bad:
        put(s3, bucket, key, b"bad")
    put(s3, bucket, f"{PREFIX}/both/inner.txt", b"inner")  # "both" is a file and a folder
    mnt = tmp_path / "sandbox" / "cache"
    mnt.mkdir(parents=True)
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}", mountpoint=mnt)
    names = fs.listdir(m.path / PREFIX)
    assert names == ["both", "good.txt", "trail"]
    assert fs.listdir(m.path / PREFIX / "both") == ["inner.txt"]
    assert fs.read(m.file(good)) == b"good"
    assert fs.read(m.file(f"{PREFIX}/both/inner.txt")) == b"inner"
    log = m.log()
    for reason in ("'..' path component", "'.' path component", "empty path component",
                   "longer than 255 bytes", "control character", "both a file and a folder"):
        assert reason in log, reason
    m.stop()
    assert sorted(os.listdir(tmp_path / "sandbox")) == ["cache"], "something was written outside the store"
    assert not (mnt / "download" / "files" / "escape.txt").exists()


def test_sigterm_and_sigint_unmount_and_exit_zero(mount, bucket, model, fs: FS):
    for sig in (signal.SIGTERM, signal.SIGINT):
        m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
        assert fs.listdir(m.path) == ["download"]
        assert m.process.stop(sig) == 0
        assert not is_mounted(m.path)
        assert "Traceback" not in m.log()


def test_lazyfs_umount_from_another_shell(mount, bucket, model, fs: FS):
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    fd = fs.run(os.open, m.path / PREFIX / "config.json", os.O_RDONLY)
    try:
        busy = lazyfs_cli(["umount", str(m.path)])  # a file on it is open
    finally:
        os.close(fd)
    assert busy.returncode == 1 and busy.stderr.count("\n") == 1, busy.stderr
    assert f"lazyfs umount --lazy {m.path}" in busy.stderr, busy.stderr
    res = lazyfs_cli(["umount", str(m.path)])
    assert res.returncode == 0, res.stderr
    assert m.process.proc.wait(15) == 0
    assert not is_mounted(m.path)
    again = lazyfs_cli(["umount", str(m.path)])
    assert again.returncode == 1 and "not mounted" in again.stderr


def test_lazyfs_umount_of_a_symlink_to_the_mountpoint(mount, bucket, model, fs: FS, tmp_path: Path):
    """As umount(8) and fusermount3 take it: the mount the link leads to (was
    `LINK is not mounted`, exit 1)."""
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    link = tmp_path / "cache-link"
    link.symlink_to(m.path)
    res = lazyfs_cli(["umount", str(link)])
    assert res.returncode == 0 and res.stdout.strip() == f"lazyfs: unmounted {m.path}", (res.stdout, res.stderr)
    assert m.process.proc.wait(15) == 0
    assert not is_mounted(m.path)


@pytest.mark.log_errors('object store kept failing')
def test_failed_download_gives_eio_and_a_later_open_retries(mount, proxy, bucket, s3, fs: FS):
    from support.proxy import Fault

    key = f"{PREFIX}/flaky.bin"
    data = os.urandom(100_000)
    put(s3, bucket, key, data)
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    proxy.add(Fault("status", key=key, status=500, code="InternalError", times=None))
    with pytest.raises(OSError) as info:
        fs.read(m.file(key))
    assert info.value.errno == errno.EIO
    proxy.clear_faults()
    assert fs.read(m.file(key)) == data
    assert 'download of "s3://' in m.log() and "InternalError" in m.log()


def test_stale_mount_after_a_crash_is_cleaned_up_at_the_next_start(mount, proxy, bucket, model, fs: FS):
    key = f"{PREFIX}/config.json"
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    assert fs.read(m.file(key)) == model[key]
    m.process.kill()  # kill -9: the mount stays behind, dead
    with pytest.raises(OSError) as info:
        fs.run(os.statvfs, str(m.path))
    assert info.value.errno == errno.ENOTCONN
    m2 = mount("--prefix", f"s3://{bucket}/{PREFIX}", mountpoint=m.path)
    assert fs.read(m2.file(key)) == model[key]
    assert "stale mount" in m2.log()


def test_a_killed_daemon_ends_a_waiting_read_with_a_short_count_then_enotconn_and_an_mmap_reader_with_sigbus(
        mount, proxy, s3, bucket, fs: FS):
    """`kill -9` of the daemon while readers wait on GETs that stall: the
    kernel splits a large read of a big file (direct_io, 64 MiB or more) into
    1 MiB requests; the bytes answered before the kill come back as a short
    count, the right ones, and the next read fails with ENOTCONN; a reader
    of a mapped file waiting in a page fault gets SIGBUS (README, failure
    table: a reader must loop on short reads)."""
    big, small = f"{PREFIX}/big.bin", f"{PREFIX}/small.bin"
    data = os.urandom(72 << 20)
    put(s3, bucket, big, data)
    put(s3, bucket, small, os.urandom(16 << 20))
    proxy.add(Fault("stall", key=big, after=4 << 20, seconds=300, times=None))  # 4 MiB of each GET, then nothing
    proxy.add(Fault("stall", key=small, after=0, seconds=300, times=None))
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}", "--read-deadline", "120", "--read-timeout", "300")
    fd = fs.run(os.open, str(m.file(big)), os.O_RDONLY)
    mapper: subprocess.Popen[bytes] | None = None
    try:
        reader = fs.start(os.pread, fd, 8 << 20, 0)
        # In a child: a page fault holds the GIL while the kernel waits on the mount.
        mapper = subprocess.Popen([sys.executable, "-c", "import mmap, sys\n"
                                   "f = open(sys.argv[1], 'rb')\n"
                                   "mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)[5_000_000]\n",
                                   str(m.file(small))], stderr=subprocess.DEVNULL)
        wait_until(lambda: proxy.requests("GET", big) and proxy.requests("GET", small), what="the stalled GETs")
        with pytest.raises(TimeoutError):
            reader.result(timeout=2)  # the first MiBs are in; the rest waits
        m.process.kill()
        got = reader.result(timeout=10)
        assert 0 < len(got) < 8 << 20 and got == data[:len(got)], len(got)
        with pytest.raises(OSError) as info:
            fs.run(os.pread, fd, 8 << 20, len(got))
        assert info.value.errno == errno.ENOTCONN
        assert mapper.wait(timeout=10) == -signal.SIGBUS
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        if mapper is not None and mapper.poll() is None:
            mapper.kill()
            mapper.wait()


def test_a_hung_mount_is_reported_then_forced_off_freeing_its_waiting_readers(mount, bucket, model, fs: FS):
    key = f"{PREFIX}/config.json"
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    m.process.send(signal.SIGSTOP)  # a hung daemon: the kernel's requests go unanswered
    try:
        waiting = fs.start(Path.read_bytes, m.file(key))
        with pytest.raises(TimeoutError):
            waiting.result(timeout=0.5)
        # A readiness probe and doctor say so in 5 s instead of hanging with the mount.
        source = ["--prefix", f"s3://{bucket}/{PREFIX}"]
        probe, doctor = (fs.start(lazyfs_cli, args, mount.env()) for args in (
            ["status", "--store", str(m.path), *source, "--require-all"], ["doctor", str(m.path), *source]))
        fix = f"lazyfs umount --force {m.path}"
        res = probe.result(60)
        assert res.returncode == 1 and "not responding" in res.stderr and fix in res.stderr, res.stderr
        res = doctor.result(60)
        assert res.returncode == 1 and "is mounted but not responding" in res.stdout and fix in res.stdout
        res = lazyfs_cli(["umount", "--force", str(m.path)])
        assert res.returncode == 0, res.stderr
        with pytest.raises(OSError) as info:
            waiting.result(timeout=10)  # freed at once, not when the daemon comes back
        assert info.value.errno in (errno.ECONNABORTED, errno.ENOTCONN)
        assert not is_mounted(m.path)
    finally:
        m.process.send(signal.SIGCONT)
    assert m.process.proc.wait(15) == 0  # its connection gone, the daemon exits as after an unmount
    assert "Traceback" not in m.log()


def test_a_forced_unmount_of_a_live_daemon_with_reads_waiting_ends_it_at_once(mount, proxy, bucket, model, fs: FS):
    """`lazyfs umount --force` while reads wait on GETs that stall: the readers
    fail at once, and the daemon, whose kernel connection is gone, abandons
    the requests in flight (no reply could reach anyone) and stops as at
    SIGTERM, long before --read-deadline, with no ERROR line."""
    key = f"{PREFIX}/llm/model.bin"
    proxy.add(Fault("stall", key=key, times=None, seconds=300))
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}", "--read-deadline", "120")
    readers = [fs.start(Path.read_bytes, m.file(key)) for _ in range(2)]
    wait_until(lambda: proxy.requests("GET", key), what="the stalled GET")
    with pytest.raises(TimeoutError):
        readers[0].result(timeout=1)
    res = lazyfs_cli(["umount", "--force", str(m.path)])
    assert res.returncode == 0, res.stderr
    for reader in readers:
        with pytest.raises(OSError) as info:
            reader.result(timeout=10)
        assert info.value.errno in (errno.ECONNABORTED, errno.ENOTCONN)
    # Within a few seconds, as a stop does: far from the 120 s a waiting read could last.
    assert m.process.proc.wait(40) == 0
    log = m.log()
    assert "abandoned because the kernel connection was aborted" in log, log[-3000:]
    assert "lazyfs stopped" in log and "fuse_reply" not in log
    assert not is_mounted(m.path)


def test_the_next_start_takes_over_a_lazyfs_mount_that_does_not_answer(mount, bucket, model, fs: FS):
    key = f"{PREFIX}/config.json"
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    m.process.send(signal.SIGSTOP)  # hung, or a daemon killed with a thread stuck in the kernel
    try:
        waiting = fs.start(Path.read_bytes, m.file(key))
        # A restarted sidecar, say: it must not fail for ever on the mount its predecessor left.
        m2 = mount("--prefix", f"s3://{bucket}/{PREFIX}", mountpoint=m.path)
        with pytest.raises(OSError) as info:
            waiting.result(timeout=10)
        assert info.value.errno in (errno.ECONNABORTED, errno.ENOTCONN)
        assert fs.read(m2.file(key)) == model[key]
        assert "has not answered for 5 s; aborting its connection" in m2.log()
    finally:
        m.process.send(signal.SIGCONT)
    assert m.process.proc.wait(15) == 0
    assert fs.read(m2.file(key)) == model[key]  # the old daemon's exit left the new mount alone


def test_a_mountpoint_named_with_spaces_a_backslash_and_non_ascii(mount, bucket, model, tmp_path, fs: FS):
    """The mount table escapes such names (\\040, \\134): status, umount, the
    stale-mount clean-up and the takeover find the mount all the same."""
    mnt = tmp_path / "my models\\v1 ünï" / "cache dir"
    key = f"{PREFIX}/config.json"
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}", mountpoint=mnt)
    assert fs.read(m.file(key)) == model[key]
    source = ["--prefix", f"s3://{bucket}/{PREFIX}"]
    res = lazyfs_cli(["status", "--store", str(mnt), *source], mount.env())
    assert res.returncode == 0 and f"as served by the lazyfs mount at {mnt}" in res.stdout, res.stdout + res.stderr
    m.process.kill()
    m2 = mount("--prefix", f"s3://{bucket}/{PREFIX}", mountpoint=mnt)
    assert "stale mount" in m2.log() and fs.read(m2.file(key)) == model[key]
    res = lazyfs_cli(["umount", str(mnt)])
    assert res.returncode == 0, res.stderr
    assert m2.process.proc.wait(15) == 0 and not is_mounted(mnt)


@pytest.mark.long
def test_no_command_hangs_on_a_path_inside_a_mount_that_does_not_answer(mount, proxy, bucket, model, tmp_path,
                                                                        fs: FS):
    """A store, prebaked layer or bake folder given on (or inside) a hung FUSE
    mount: every command says so and exits, where a stat of the path would
    wait for ever."""
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    m.process.send(signal.SIGSTOP)
    try:
        source = ["--prefix", f"s3://{bucket}/{PREFIX}", "--endpoint-url", proxy.endpoint]
        other = tmp_path / "other"
        other.mkdir()
        link = tmp_path / "models"
        link.symlink_to(m.path / "v1")  # the link itself lies outside the mount
        fix = f"lazyfs umount --force {m.path}"
        commands = {
            "mount --store through a symlink into it": ["mount", str(other), "--store", str(link / "store"),
                                                        *source],
            "mount --store on it": ["mount", str(other), "--store", str(m.path), *source],
            "mount inside it": ["mount", str(m.path / "inner"), *source],
            "mount --store inside it": ["mount", str(other), "--store", str(m.path / "store"), *source],
            "mount --prebaked inside it": ["mount", str(other), "--prebaked", str(m.path / "baked"), *source],
            "bake --to inside it": ["bake", "--to", str(m.path / "baked"), *source],
            "status --store inside it": ["status", "--store", str(m.path / "store"), *source],
            "mount --config inside it": ["mount", str(other), "--config", str(m.path / "model.json"),
                                         "--endpoint-url", proxy.endpoint],
            "bake --lock inside it": ["bake", "--to", str(other), "--lock", str(m.path / "lazyfs.lock"), *source],
        }
        running = {what: fs.start(lambda a: lazyfs_cli(a, mount.env(), timeout=30), args)
                   for what, args in commands.items()}
        doctors = [fs.start(lambda a: lazyfs_cli(a, mount.env(), timeout=30), ["doctor", *where, *source])
                   for where in ([str(other), "--store", str(m.path / "store")], [str(m.path / "inner")])]
        for what, res in ((what, run.result(60)) for what, run in running.items()):
            assert res.returncode == 1, (what, res.returncode, res.stderr)
            assert "not responding" in res.stderr and fix in res.stderr, (what, res.stderr)
            assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, (what, res.stderr)
        for res in (run.result(60) for run in doctors):  # each check says so; the others still run
            assert res.returncode == 1 and "mount that is not responding" in res.stdout and fix in res.stdout
            assert "Traceback" not in res.stderr + res.stdout
        assert not is_mounted(other)
    finally:
        lazyfs_cli(["umount", "--force", str(m.path)])
        m.process.send(signal.SIGCONT)
    assert m.process.proc.wait(15) == 0


def test_a_live_mount_is_not_mounted_over(mount, bucket, model, fs: FS):
    m = mount("--prefix", f"s3://{bucket}/{PREFIX}")
    res = lazyfs_cli(["mount", str(m.path), "--prefix", f"s3://{bucket}/{PREFIX}"])
    assert res.returncode == 1
    assert "is already mounted" in res.stderr and "lazyfs umount" in res.stderr
    assert fs.listdir(m.path) == ["download"]
