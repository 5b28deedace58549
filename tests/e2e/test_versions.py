"""End to end (issue 4): identity beyond size, refreshes while mounted, open
handles keeping their version, offline start, bake, status."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, on_both_clients, wait_until
from support.mountproc import force_unmount
from support.proxy import Fault
from support.s3server import clean_env, free_port, s3_client

pytestmark = pytest.mark.fuse

P = "models/m"


def put(s3, bucket: str, key: str, data: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=data)


def refresh(m) -> None:
    """SIGHUP, then wait until the refresh has been applied."""
    before = m.log().count("listing changed")
    m.process.send(signal.SIGHUP)
    wait_until(lambda: m.log().count("listing changed") > before, what="the refresh")


@on_both_clients
def test_same_size_new_version_is_detected_by_etag(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    key = f"{P}/w.bin"
    v1, v2 = os.urandom(50_000), os.urandom(50_000)
    put(s3, bucket, key, v1)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m.file(key)) == v1
    put(s3, bucket, key, v2)  # same size, new ETag
    refresh(m)
    assert fs.read(m.file(key)) == v2
    assert proxy.count("GET", key) == 2
    # Published once verified; a stop before that would abandon the check.
    wait_until(lambda: (store / key).read_bytes() == v2, what="v2 in the store")
    m.stop()
    # Across a restart too: the store's copy records v2; S3 now has v3, same size.
    v3 = os.urandom(50_000)
    put(s3, bucket, key, v3)
    m2 = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m2.file(key)) == v3


def test_refresh_adds_and_removes_objects(mount, s3, bucket, fs: FS):
    put(s3, bucket, f"{P}/keep.txt", b"keep")
    put(s3, bucket, f"{P}/gone.txt", b"gone")
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0")
    assert fs.listdir(m.path / P) == ["gone.txt", "keep.txt"]
    with pytest.raises(OSError):
        fs.stat(m.file(f"{P}/new/added.txt"))  # a negative entry the kernel may cache
    s3.delete_object(Bucket=bucket, Key=f"{P}/gone.txt")
    put(s3, bucket, f"{P}/new/added.txt", b"added")
    refresh(m)
    assert fs.listdir(m.path / P) == ["keep.txt", "new"]
    assert fs.read(m.file(f"{P}/new/added.txt")) == b"added"
    with pytest.raises(OSError) as info:
        fs.stat(m.file(f"{P}/gone.txt"))
    assert info.value.errno == errno.ENOENT


def test_the_refresh_timer_picks_up_changes(mount, s3, bucket, fs: FS):
    put(s3, bucket, f"{P}/a.txt", b"a")
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "1")
    assert fs.listdir(m.path / P) == ["a.txt"]
    put(s3, bucket, f"{P}/b.txt", b"b")
    wait_until(lambda: fs.listdir(m.path / P) == ["a.txt", "b.txt"], what="the timed refresh")


@on_both_clients
def test_an_open_handle_keeps_reading_its_version(mount, s3, bucket, fs: FS):
    key = f"{P}/w.bin"
    v1, v2 = os.urandom(300_000), os.urandom(200_000)
    put(s3, bucket, key, v1)
    m = mount("--prefix", f"s3://{bucket}/{P}")
    f = fs.run(open, m.file(key), "rb")
    try:
        assert fs.run(f.read, 1000) == v1[:1000]
        put(s3, bucket, key, v2)
        refresh(m)
        assert fs.read(m.file(key)) == v2, "a new open sees the new version"
        assert fs.run(f.read) == v1[1000:], "the open handle keeps reading the version it opened"
    finally:
        f.close()


@pytest.mark.log_errors('has no current local copy and the mount is offline')
@pytest.mark.parametrize("verify", ["size", "etag"])
def test_offline_start_serves_what_the_store_knows(mount, proxy, s3, bucket, fs: FS, tmp_path: Path, verify: str):
    """Its line counts what opens will serve: under --verify etag an admin's copy (no record) is hashed when
    opened, and refused if its bytes are wrong, so it is counted apart, not as served."""
    cached, uncached, baked = f"{P}/cached.bin", f"{P}/uncached.bin", f"{P}/baked.bin"
    for k in (cached, uncached, baked):
        put(s3, bucket, k, k.encode() * 100)
    store = tmp_path / "store"
    (store / P).mkdir(parents=True)
    (store / baked).write_bytes(baked.encode() * 100)  # an admin's copy, no identity record
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m.file(cached)) == cached.encode() * 100
    wait_until((store / cached).exists, what="publication")
    m.stop()
    # The object store is down: every connection is reset before an answer (after botocore's retries).
    # (An error status is an answer: the object store is reachable, and the start is no offline one.)
    proxy.add(Fault("drop", method=None, times=None))
    m2 = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "1", "--verify", verify, store=store)
    assert "ready OFFLINE" in m2.process.stdout_lines[0]
    said = ("2 of them on disk;" if verify == "size" else
            "2 of them on disk (1 with no identity record, checked by content when opened: one that does not "
            "match is not served);")
    assert f"starting offline with the 3 files the store knows, {said}" in m2.log(), m2.log()
    assert fs.listdir(m2.path / P) == ["baked.bin", "cached.bin", "uncached.bin"]
    assert fs.read(m2.file(cached)) == cached.encode() * 100
    assert fs.read(m2.file(baked)) == baked.encode() * 100
    with pytest.raises(OSError) as info:
        fs.read(m2.file(uncached), timeout=5)  # fails at once, no hang
    assert info.value.errno == errno.EIO
    proxy.clear_faults()  # the object store is back: the next refresh restores everything
    wait_until(lambda: "online again, the object store answered" in m2.log(), timeout=30, what="going online")
    assert fs.read(m2.file(uncached)) == uncached.encode() * 100


def test_offline_with_nothing_local_fails_at_start(tmp_path: Path):
    (tmp_path / "mnt").mkdir()
    res = lazyfs_cli(["mount", str(tmp_path / "mnt"), "--prefix", "s3://bkt/m",
                      "--endpoint-url", f"http://127.0.0.1:{free_port()}"])
    assert res.returncode == 1 and "nothing to serve" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.log_errors("listing failed")
def test_a_saved_listing_with_no_file_on_disk_is_nothing_to_serve(mount, proxy, s3, bucket, fs: FS,
                                                                    tmp_path: Path):
    """Before: it came up OFFLINE "with the 2 files the store knows", and
    every one of them failed with EIO."""
    keys = [f"{P}/a.bin", f"{P}/b.bin"]
    for k in keys:
        put(s3, bucket, k, k.encode())
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.listdir(m.path / P) == ["a.bin", "b.bin"]  # listed and saved; nothing read
    wait_until(lambda: any((store / ".lazyfs" / "listings").glob("*.json")), what="the saved listing")
    m.stop()
    down = f"http://127.0.0.1:{free_port()}"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        res = lazyfs_cli(["mount", str(mnt), "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", down,
                          "--store", str(store)], timeout=30)
    finally:
        force_unmount(mnt)  # had it mounted after all
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("lazyfs: error:")]
    assert res.returncode == 1 and len(errors) == 1, res.stderr
    assert "nothing to serve" in errors[0] and "it knows 2 files, none of them on disk" in errors[0]
    # A copy of one of them in a prebaked layer is something to serve.
    baked = tmp_path / "baked"
    (baked / P).mkdir(parents=True)
    (baked / keys[0]).write_bytes(keys[0].encode())
    m2 = mount("--prefix", f"s3://{bucket}/{P}", "--prebaked", str(baked), endpoint=down, store=store)
    assert "ready OFFLINE" in m2.process.stdout_lines[0]
    assert "2 files the store knows, 1 of them on disk" in m2.log()
    assert fs.read(m2.file(keys[0])) == keys[0].encode()


# Every LIST is held without an answer: an object store that accepts
# connections and never answers (the proxy's thread sleeps it out).
LISTS_NEVER_ANSWER = Fault("delay", method="GET", query={"list-type": "2"}, seconds=120, times=None)
# --read-timeout 2: the start-up waits one request's connect (5 s) and read
# timeouts, 7 s.  --retries 10: botocore would try eleven times (22 s and
# more), which the start-up no longer waits for.
NO_ANSWER_ARGS = ("--read-timeout", "2", "--retries", "10")
NO_ANSWER_BOUND_S = 15.0


def test_an_object_store_that_never_answers_fails_the_start_in_bounded_time(proxy, bucket, tmp_path: Path):
    """Before: silent for --retries x --read-timeout (100 s by default), then exit 1."""
    (tmp_path / "mnt").mkdir()
    proxy.add(LISTS_NEVER_ANSWER)
    started = time.monotonic()
    res = lazyfs_cli(["mount", str(tmp_path / "mnt"), "--prefix", f"s3://{bucket}/{P}", "--endpoint-url",
                      proxy.endpoint, "--store", str(tmp_path / "store"), *NO_ANSWER_ARGS], timeout=120)
    took = time.monotonic() - started
    assert res.returncode == 1, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("lazyfs: error:")]
    assert len(errors) == 1 and "did not answer within 7 s" in errors[0] and "nothing to serve" in errors[0], \
        res.stderr
    assert "waiting for the object store" in res.stderr, "the wait was silent"
    assert "Traceback" not in res.stderr
    assert took < NO_ANSWER_BOUND_S, f"exit 1 after {took:.1f} s"


@pytest.mark.log_errors("listing failed", 'has no current local copy and the mount is offline')
def test_an_object_store_that_never_answers_starts_offline_in_bounded_time(mount, proxy, s3, bucket, fs: FS,
                                                                             tmp_path: Path):
    cached, uncached = f"{P}/cached.bin", f"{P}/uncached.bin"
    for k in (cached, uncached):
        put(s3, bucket, k, k.encode() * 100)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m.file(cached)) == cached.encode() * 100
    wait_until((store / cached).exists, what="publication")
    m.stop()
    proxy.add(LISTS_NEVER_ANSWER)
    started = time.monotonic()
    m2 = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "1", *NO_ANSWER_ARGS, store=store)
    took = time.monotonic() - started
    assert "ready OFFLINE" in m2.process.stdout_lines[0]
    assert took < NO_ANSWER_BOUND_S, f"ready after {took:.1f} s"
    assert "did not answer within 7 s" in m2.log() and "waiting for the object store" in m2.log()
    assert fs.listdir(m2.path / P) == ["cached.bin", "uncached.bin"]
    assert fs.read(m2.file(cached)) == cached.encode() * 100
    with pytest.raises(OSError) as info:
        fs.read(m2.file(uncached), timeout=5)
    assert info.value.errno == errno.EIO
    # The store answers again: the refresher's listing brings the mount online
    # (the start-up check's late outcome, if any, changes nothing).
    proxy.clear_faults()
    wait_until(lambda: "online again, the object store answered" in m2.log(), timeout=60, what="going online")
    assert fs.read(m2.file(uncached)) == uncached.encode() * 100


def test_a_stop_while_the_start_waits_for_the_object_store_exits_at_once(proxy, bucket, tmp_path: Path):
    (tmp_path / "mnt").mkdir()
    proxy.add(LISTS_NEVER_ANSWER)
    log_path = tmp_path / "lazyfs.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "mount", str(tmp_path / "mnt"), "--prefix",
                                 f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint],
                                stdout=subprocess.DEVNULL, stderr=log, env=clean_env())
    try:
        wait_until(lambda: "waiting for the object store" in log_path.read_text(), timeout=30,
                   what="the start-up to wait")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def bake(proxy, bucket: str, to: Path, *extra: str):
    return lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                       "--to", str(to), *extra], timeout=120)


def test_bake_twice_then_one_changed_object(proxy, s3, bucket, tmp_path: Path):
    files = {f"{P}/{n}": os.urandom(70_000 + i) for i, n in enumerate(["a.bin", "b.bin", "sub/c.bin"])}
    for k, v in files.items():
        put(s3, bucket, k, v)
    to = tmp_path / "image-cache"
    first = bake(proxy, bucket, to)
    assert first.returncode == 0, first.stderr
    assert "3 files: 3 downloaded" in first.stdout
    for k, v in files.items():
        assert (to / k).read_bytes() == v
        assert json.loads(os.getxattr(to / k, "user.lazyfs.identity"))["origin"] == "bake"
    gets = proxy.count("GET")
    second = bake(proxy, bucket, to)
    assert second.returncode == 0 and "0 downloaded (0.0 MiB), 3 already current" in second.stdout
    assert proxy.count("GET") == gets, "the second bake downloaded something"
    new = os.urandom(70_001)  # same size as b.bin, new content
    put(s3, bucket, f"{P}/b.bin", new)
    third = bake(proxy, bucket, to)
    assert "1 downloaded" in third.stdout and "2 already current" in third.stdout
    assert (to / P / "b.bin").read_bytes() == new
    assert {r["key"] for r in proxy.requests("GET")[gets:]} == {f"{P}/b.bin"}


def test_bake_reports_failures_and_exits_1(proxy, s3, bucket, tmp_path: Path):
    put(s3, bucket, f"{P}/ok.bin", b"ok")
    put(s3, bucket, f"{P}/bad.bin", b"bad")
    proxy.add(Fault("status", key=f"{P}/bad.bin", status=403, code="AccessDenied", times=None))
    res = bake(proxy, bucket, tmp_path / "out")
    assert res.returncode == 1
    assert "1 downloaded" in res.stdout and "1 failed" in res.stdout and "bad.bin" in res.stdout


def status(proxy, bucket: str, store: Path, *extra: str):
    return lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                       "--store", str(store), *extra])


@on_both_clients
def test_status_states_and_require_all(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    names = ["cached.bin", "prebaked.bin", "stale.bin", "partial.bin", "missing.bin"]
    for n in names:
        put(s3, bucket, f"{P}/{n}", os.urandom(4 * 65536))
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", store=store)
    fs.read(m.file(f"{P}/cached.bin"))
    fs.read(m.file(f"{P}/stale.bin"))
    proxy.add(Fault("stall", key=f"{P}/partial.bin", min_offset=65536, seconds=30, times=None))
    fd = fs.run(os.open, str(m.file(f"{P}/partial.bin")), os.O_RDONLY)
    assert len(fs.run(os.pread, fd, 100, 0)) == 100
    wait_until(lambda: (store / f"{P}/cached.bin").exists() and (store / f"{P}/stale.bin").exists(),
               what="publication")
    state = fs.run(os.getxattr, str(m.file(f"{P}/partial.bin")), "user.lazyfs.state")
    assert state == b"downloading"
    wait_until(lambda: any((store / ".lazyfs" / "tmp").glob("*.json")), what="download state")
    time.sleep(1.2)  # state files are written at most once a second
    m.process.kill()
    try:
        os.close(fd)
    except OSError:
        pass  # the mount is dead
    (store / f"{P}/prebaked.bin").write_bytes(os.urandom(4 * 65536))
    put(s3, bucket, f"{P}/stale.bin", os.urandom(4 * 65536))  # same size, new version
    proxy.clear_faults()
    res = status(proxy, bucket, store)
    assert res.returncode == 0, res.stderr
    got = {line.split()[-1].rsplit("/", 1)[-1]: line.split()[0] for line in res.stdout.splitlines()[1:-1]}
    assert got == {n: n.split(".")[0] for n in names}, res.stdout
    assert "1 cached, 1 prebaked, 0 downloading, 1 partial, 1 stale, 1 missing (not ready" in res.stdout
    assert status(proxy, bucket, store, "--require-all").returncode == 1
    js = json.loads(status(proxy, bucket, store, "--json").stdout)
    assert js["ready"] is False and js["totals"]["files"] == 5
    # After a bake everything is cached, and the probe passes.
    assert bake(proxy, bucket, store).returncode == 0
    assert status(proxy, bucket, store, "--require-all").returncode == 0


def test_status_through_a_running_mount(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    put(s3, bucket, f"{P}/a.bin", b"a" * 1000)
    put(s3, bucket, f"{P}/b.bin", b"b" * 1000)
    m = mount("--prefix", f"s3://{bucket}/{P}")
    fs.read(m.file(f"{P}/a.bin"))
    wait_until(lambda: fs.run(os.getxattr, str(m.file(f"{P}/a.bin")), "user.lazyfs.state") == b"cached",
               what="publication")
    res = lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--store", str(m.path), "--require-all"])
    assert "as served by the lazyfs mount" in res.stdout
    assert "1 cached" in res.stdout and "1 missing" in res.stdout and res.returncode == 1
    # With no --config or --prefix, the mount names its own folders (before: exit 2, "nothing to serve").
    alone = lazyfs_cli(["status", "--store", str(m.path), "--require-all"])
    assert alone.stdout == res.stdout and alone.returncode == 1, alone.stderr
    # A plain folder still needs them.
    plain = lazyfs_cli(["status", "--store", str(tmp_path)])
    assert plain.returncode == 2 and "nothing to serve" in plain.stderr


def test_status_takes_the_mountpoint_as_df_does(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """`lazyfs status MNT` was "unrecognized arguments", exit 2: it is the
    mount at MNT, as `--store MNT` names it; once nothing runs there, its
    store (--store, else the folder itself)."""
    put(s3, bucket, f"{P}/a.bin", b"a" * 1000)
    put(s3, bucket, f"{P}/b.bin", b"b" * 1000)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    fs.read(m.file(f"{P}/a.bin"))
    wait_until(lambda: fs.run(os.getxattr, str(m.file(f"{P}/a.bin")), "user.lazyfs.state") == b"cached",
               what="publication")
    by_flag = lazyfs_cli(["status", "--store", str(m.path), "--require-all"])
    assert "as served by the lazyfs mount" in by_flag.stdout and by_flag.returncode == 1, by_flag.stderr
    for where in (str(m.path), os.path.relpath(m.path)):
        res = lazyfs_cli(["status", where, "--require-all"])
        assert res.stdout == by_flag.stdout and res.returncode == 1 and res.stderr == "", res.stderr
    js = json.loads(lazyfs_cli(["status", str(m.path), "--json", "--store", str(tmp_path / "other")]).stdout)
    assert js["totals"]["files"] == 2, "a running mount is asked, whatever --store says"
    assert m.process.stop() == 0
    source = ["--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint]
    stopped = lazyfs_cli(["status", str(m.path), "--store", str(store), *source])
    assert stopped.returncode == 0, stopped.stderr
    assert f"store {store}, listing from the object store" in stopped.stdout and "1 cached" in stopped.stdout
    beneath = lazyfs_cli(["status", str(m.path), *source])  # the mount's default store: its folder
    assert f"store {m.path}," in beneath.stdout and "2 missing" in beneath.stdout, beneath.stdout
    alone = lazyfs_cli(["status", str(m.path)])  # no mount runs there, and no folder is named
    assert alone.returncode == 2 and "nothing to serve" in alone.stderr
    missing = lazyfs_cli(["status", str(tmp_path / "nope"), *source])
    assert missing.returncode == 2
    assert missing.stderr == f"lazyfs: error: mountpoint {tmp_path / 'nope'} does not exist\n"


def test_status_of_a_path_that_is_no_folder_says_so_without_a_folder_to_serve(tmp_path: Path):
    """`lazyfs status NOPE` said "nothing to serve: give --config model.json
    or --prefix FOLDER" (exit 2), though with --prefix the same path said it
    does not exist: the path is the mistake, whatever else is given."""
    afile = tmp_path / "a-file"
    afile.write_bytes(b"x")
    for path, says in ((tmp_path / "nope", "does not exist"), (afile, "is not a directory")):
        for extra in ([], ["--prefix", "s3://bkt/x"]):
            res = lazyfs_cli(["status", str(path), *extra])
            assert res.returncode == 2, res.stderr
            assert res.stderr == f"lazyfs: error: mountpoint {path} {says}\n", res.stderr
        res = lazyfs_cli(["status", "--store", str(path)])
        assert (res.returncode, res.stderr) == (2, f"lazyfs: error: store {path} {says}\n")


def test_status_of_folders_a_running_mount_does_not_serve_is_not_ready(mount, proxy, s3, bucket, fs: FS,
                                                                      tmp_path: Path):
    """Asked about a folder the mount does not serve (a typo in --prefix, the
    wrong model.json), status found none of its files on the mount and said
    "0 files ... (ready; as served by ...)", exit 0 with --require-all: a
    readiness probe that passed for nothing.  Not ready now, naming what the
    mount serves; the folders it serves (or one inside them) as before."""
    put(s3, bucket, f"{P}/a.bin", b"a" * 1000)
    put(s3, bucket, f"{P}/sub/b.bin", b"b" * 1000)
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store")
    for name in ("a.bin", "sub/b.bin"):
        fs.read(m.file(f"{P}/{name}"))
        wait_until(lambda n=name: fs.run(os.getxattr, str(m.file(f"{P}/{n}")), "user.lazyfs.state") == b"cached",
                   what="publication")
    source = ["--endpoint-url", proxy.endpoint, "--bucket", bucket, "--require-all"]
    served = f"the mount serves s3://{bucket}/{P}/, not"
    for prefix in ("nope", f"{P}-typo", f"{P}/nosuch"):
        res = lazyfs_cli(["status", str(m.path), "--prefix", prefix, *source])
        assert res.returncode == 1, res.stdout + res.stderr
        assert f"(not ready: {served} s3://{bucket}/{prefix}/;" in res.stdout and res.stderr == "", res.stdout
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"download_files_from": f"s3://{bucket}/typo-folder",
                                "download_files_to": str(m.path)}))
    res = lazyfs_cli(["status", "--config", str(typo), "--require-all", "--json", "--endpoint-url", proxy.endpoint])
    js = json.loads(res.stdout)
    assert res.returncode == 1 and js["ready"] is False, res.stdout
    assert js["unknown"] == f"{served} s3://{bucket}/typo-folder/"
    # Another bucket's folder of the same name: none of the mount's files (it listed all of them as its own).
    res = lazyfs_cli(["status", str(m.path), "--prefix", f"s3://other-bucket/{P}", *source[:2], "--json"])
    js = json.loads(res.stdout)
    assert js["ready"] is False and js["totals"]["files"] == 0, res.stdout
    for prefix, files in ((P, 2), (f"{P}/sub", 1)):  # served: ready as before
        res = lazyfs_cli(["status", str(m.path), "--prefix", prefix, *source])
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{files} file" in res.stdout and f"{files} cached" in res.stdout and "(ready;" in res.stdout


@on_both_clients
def test_a_new_version_prefix_downloads_only_what_changed(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    same = {"config.json": b'{"layers": 2}', "tokenizer.json": os.urandom(30_000),
            "shard-1.bin": os.urandom(200_000)}
    for name, data in same.items():
        put(s3, bucket, f"my-model/v3/{name}", data)
        put(s3, bucket, f"my-model/v4/{name}", data)
    put(s3, bucket, "my-model/v3/shard-2.bin", os.urandom(200_000))
    changed = os.urandom(200_000)
    put(s3, bucket, "my-model/v4/shard-2.bin", changed)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/my-model/v3", store=store)
    for name in list(same) + ["shard-2.bin"]:
        fs.read(m.file(f"my-model/v3/{name}"))
    wait_until(lambda: all((store / "my-model/v3" / n).exists() for n in list(same) + ["shard-2.bin"]),
               what="v3 in the store")
    m.stop()
    proxy.clear()
    m = mount("--prefix", f"s3://{bucket}/my-model/v4", store=store)
    for name, data in same.items():
        assert fs.read(m.file(f"my-model/v4/{name}")) == data
    assert fs.read(m.file("my-model/v4/shard-2.bin")) == changed
    assert {r["key"] for r in proxy.requests("GET")} == {"my-model/v4/shard-2.bin"}
    assert m.log().count("linked, not downloaded") == 3
    # The same holds for bake: v4 into an image that has v3.
    image = tmp_path / "image"
    assert bake_prefix(proxy, bucket, "my-model/v3", image).returncode == 0
    proxy.clear()
    res = bake_prefix(proxy, bucket, "my-model/v4", image)
    assert res.returncode == 0 and "4 files: 1 downloaded" in res.stdout
    assert {r["key"] for r in proxy.requests("GET")} == {"my-model/v4/shard-2.bin"}


def bake_prefix(proxy, bucket: str, prefix: str, to: Path):
    return lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{prefix}", "--endpoint-url", proxy.endpoint,
                       "--to", str(to)], timeout=120)


@pytest.mark.log_errors('downloaded bytes do not match')
@on_both_clients
def test_a_corrupted_body_is_never_published(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    key = f"{P}/w.bin"
    data = os.urandom(100_000)
    put(s3, bucket, key, data)
    store = tmp_path / "store"
    proxy.add(Fault("corrupt", key=key, times=None))  # right length, wrong bytes, every time
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    try:
        fs.read(m.file(key))
    except OSError:
        pass  # the reader may or may not see the bad bytes; what matters is below
    wait_until(lambda: "do not match the object's" in m.log(), what="the integrity failure")
    wait_until(lambda: m.log().count('download of "s3://') >= 1, what="the download to fail")
    assert not (store / key).exists(), "a corrupted download was published"
    proxy.clear_faults()
    assert fs.read(m.file(key)) == data
    wait_until((store / key).exists, what="publication")
    assert (store / key).read_bytes() == data


@pytest.mark.log_errors('downloaded bytes do not match')
@on_both_clients
def test_no_etag_check_serves_a_store_whose_etags_are_not_md5s_and_still_checks_crcs(mount, proxy, moto, s3, bucket,
                                                                                     fs: FS, tmp_path: Path):
    bare, crc = f"{P}/bare.bin", f"{P}/crc.bin"
    data = os.urandom(300_000)  # one request each
    s3_client(moto.endpoint, checksums=False).put_object(Bucket=bucket, Key=bare, Body=data)  # only an ETag
    put(s3, bucket, crc, os.urandom(len(data)))  # with the CRC32 boto3 sends (other bytes: not linked to bare)
    assert "ChecksumCRC32" not in s3.head_object(Bucket=bucket, Key=bare, ChecksumMode="ENABLED")
    # Every body differs from its ETag's MD5, the same way each time: what a
    # store whose ETags are not MD5 digests looks like.
    for key in (bare, crc):
        proxy.add(Fault("corrupt", key=key, times=None))
    served = bytes(b ^ 0xFF for b in data[:64]) + data[64:]

    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "strict")
    with contextlib.suppress(OSError):
        fs.read(m.file(bare))  # bytes read before the check come as they are
    wait_until(lambda: f"{bare}\": downloaded bytes do not match the object's MD5" in m.log(), what="the check")
    assert not (tmp_path / "strict" / bare).exists()
    m.stop()

    store = tmp_path / "lenient"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--no-etag-check", store=store)
    assert fs.read(m.file(bare)) == served
    wait_until((store / bare).exists, what="publication")
    assert fs.run(os.getxattr, str(m.file(bare)), "user.lazyfs.verified") == b"unverified"
    assert f'fetched "s3://{bucket}/{bare}": {len(data)} bytes' in m.log() and "unverified" in m.log()
    # Another key with the same ETag and size is fetched, not linked to those
    # bytes: an ETag that is not a digest need not name the same content twice.
    twin = f"{P}/twin.bin"
    s3_client(moto.endpoint, checksums=False).put_object(Bucket=bucket, Key=twin, Body=data)
    refresh(m)
    assert fs.read(m.file(twin)) == data
    assert "linked, not downloaded" not in m.log() and proxy.count("GET", twin) >= 1
    with contextlib.suppress(OSError):
        fs.read(m.file(crc))
    wait_until(lambda: f"{crc}\": downloaded bytes do not match the object's CRC32" in m.log(), what="the CRC check")
    assert not (store / crc).exists(), "bytes that fail the store's CRC were published"
    # A lock made with it records no MD5 for the bare object, and keeps the CRC.
    checks = {}
    for flags in ([], ["--no-etag-check"]):
        out = tmp_path / f"lock{len(flags)}.json"
        res = lazyfs_cli(["lock", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint, *flags,
                          "--output", str(out)])
        assert res.returncode == 0, res.stderr
        objects = json.loads(out.read_text())["folders"][0]["objects"]
        checks[tuple(flags)] = {o["key"]: (o["checksum"] or {}).get("algorithm") for o in objects}
    assert checks[()] == {bare: "MD5", twin: "MD5", crc: "CRC32"}
    assert checks[("--no-etag-check",)] == {bare: None, twin: None, crc: "CRC32"}


def test_verify_etag_checks_unrecorded_copies(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    good, bad = f"{P}/good.bin", f"{P}/bad.bin"
    gdata, bdata = os.urandom(50_000), os.urandom(50_000)
    put(s3, bucket, good, gdata)
    put(s3, bucket, bad, bdata)
    store = tmp_path / "store"
    (store / P).mkdir(parents=True)
    (store / good).write_bytes(gdata)
    (store / bad).write_bytes(os.urandom(50_000))  # right size, stale content
    m = mount("--prefix", f"s3://{bucket}/{P}", "--verify", "etag", store=store)
    assert fs.read(m.file(good)) == gdata
    assert fs.read(m.file(bad)) == bdata
    assert {r["key"] for r in proxy.requests("GET")} == {bad}
    assert "does not match the object's" in m.log()
    # The good copy's check is recorded: the next mount does not even ask S3.
    m.stop()
    proxy.clear()
    m = mount("--prefix", f"s3://{bucket}/{P}", "--verify", "etag", store=store)
    assert fs.read(m.file(good)) == gdata
    assert proxy.count("HEAD", good) == 0 and proxy.count("GET") == 0


def test_verified_says_how_each_copy_was_checked(mount, s3, bucket, fs: FS, tmp_path: Path):
    """user.lazyfs.verified names the check that was made: an admin's copy
    checked by --verify etag (stamped in the store, remembered for a
    read-only layer) and an empty file (its ETag is the MD5 of nothing) say
    their checksum or MD5, not "size"."""
    in_store, in_layer, empty = f"{P}/store.bin", f"{P}/layer.bin", f"{P}/empty.txt"
    sdata, ldata = os.urandom(50_000), os.urandom(40_000)
    put(s3, bucket, in_store, sdata)
    put(s3, bucket, in_layer, ldata)
    put(s3, bucket, empty, b"")
    store, layer = tmp_path / "store", tmp_path / "layer"
    (store / P).mkdir(parents=True)
    (store / in_store).write_bytes(sdata)
    (layer / P).mkdir(parents=True)
    (layer / in_layer).write_bytes(ldata)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--verify", "etag", "--prebaked", str(layer), store=store)

    def verified(key: str) -> str:
        return fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.verified").decode()

    assert verified(in_layer) == "size", "not opened yet: judged by its size alone"
    for key, data in ((in_store, sdata), (in_layer, ldata), (empty, b"")):
        assert fs.read(m.file(key)) == data
    wait_until(lambda: fs.run(os.getxattr, str(m.file(empty)), "user.lazyfs.state") == b"cached",
               what="the empty file published")
    checks = {key: verified(key) for key in (in_store, in_layer, empty)}
    assert all(v in ("CRC32", "CRC64NVME", "MD5") for v in checks.values()), checks


@on_both_clients
def test_cache_budget_evicts_lru_but_not_open_or_prebaked(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    size = 400_000  # three fit in the budget (at least 1 MiB: one download block)
    names = [f"{P}/f{i}.bin" for i in range(4)]
    for k in names:
        put(s3, bucket, k, k.encode().ljust(size, b"."))
    baked = f"{P}/baked.bin"
    put(s3, bucket, baked, b"b" * size)
    big = f"{P}/huge.bin"
    put(s3, bucket, big, os.urandom(4 * size))
    store = tmp_path / "store"
    (store / P).mkdir(parents=True)
    (store / baked).write_bytes(b"b" * size)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--cache-max-size", str(3 * size), store=store)
    keep_open = fs.run(open, m.file(names[0]), "rb")
    try:
        for k in names[:3]:
            fs.read(m.file(k))
            wait_until(lambda k=k: (store / k).exists(), what=f"{k} published")
        assert fs.read(m.file(names[3])) == names[3].encode().ljust(size, b".")
        wait_until((store / names[3]).exists, what="the fourth file published")
        present = {k: (store / k).exists() for k in names}
        assert present == {names[0]: True, names[1]: False, names[2]: True, names[3]: True}, present
        assert (store / baked).exists(), "a prebaked file was evicted"
        assert fs.read(m.file(baked)) == b"b" * size
        # Larger than the whole budget: served, not kept.
        assert len(fs.read(m.file(big))) == 4 * size
        wait_until(lambda: "larger than the cache budget" in m.log(), what="the warning")
        assert not (store / big).exists()
        wait_until(lambda: not list((store / ".lazyfs" / "tmp").glob("*.part")), what="the temp file to go")
        assert fs.run(keep_open.read) == names[0].encode().ljust(size, b".")
    finally:
        keep_open.close()
