"""End to end (issue 11): the store on disk as other users and other
filesystems see it: who may read it beneath the mount (--store-mode); identity
records on a filesystem without user xattrs; `status --require-all` never
saying ready without knowing every file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from support.mounting import FS, is_mounted, lazyfs_cli, wait_until
from support.mountproc import MountFailed
from support.pagecache import KERNEL_CACHES, drop_from_page_cache
from support.proxy import Fault
from support.s3server import free_port, s3_client
from support.stores import StoreUnavailable, apt_install

pytestmark = pytest.mark.fuse

P = "models/m"


def _unusable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"this test must run in CI, but {reason}")
    pytest.skip(reason)


@pytest.fixture
def no_xattr_fs(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem whose xattr handler refuses user.* on every kernel:
    ramfs (tmpfs keeps user xattrs since Linux 6.6, ext4 dropped
    nouser_xattr).  Mounting one needs CAP_SYS_ADMIN, as FUSE does."""
    path = tmp_path / "ramfs"
    path.mkdir()
    res = subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0755", "ramfs", str(path)], capture_output=True,
                         text=True, timeout=30)
    if res.returncode != 0:
        _unusable(f"a ramfs cannot be mounted here ({res.stderr.strip() or res.returncode})")
    try:
        (path / "probe").write_bytes(b"")
        try:
            os.setxattr(path / "probe", "user.x", b"1")
            _unusable("ramfs keeps user xattrs on this kernel: find another filesystem that refuses them")
        except OSError as e:
            assert e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP), e
        (path / "probe").unlink()
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def status(proxy, bucket: str, store: Path, *extra: str):
    return lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                       "--store", str(store), *extra])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_store_beneath_a_mount_is_private_by_default(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    s3.put_object(Bucket=bucket, Key=f"{P}/w.bin", Body=b"w" * 5000)
    store = tmp_path / "new" / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m.file(f"{P}/w.bin")) == b"w" * 5000
    assert fs.stat(m.file(f"{P}/w.bin")).st_mode & 0o777 == 0o444, "the mount shows what it always showed"
    wait_until((store / P / "w.bin").exists, what="the download published")
    assert {p: mode(store / p) for p in (".", ".lazyfs", "models", P)} == dict.fromkeys((".", ".lazyfs", "models", P),
                                                                                      0o700)
    assert mode(store / P / "w.bin") == 0o400


def test_bake_store_modes(proxy, s3, bucket, tmp_path: Path):
    s3.put_object(Bucket=bucket, Key=f"{P}/w.bin", Body=b"w" * 100)
    for store_mode, folder, file in ((None, 0o700, 0o400), ("group", 0o750, 0o440), ("public", 0o755, 0o444)):
        out = tmp_path / f"baked-{store_mode}"
        args = ["bake", "--prefix", f"s3://{bucket}/{P}", "--to", str(out), "--endpoint-url", proxy.endpoint]
        res = lazyfs_cli(args + ([] if store_mode is None else ["--store-mode", store_mode]))
        assert res.returncode == 0, res.stdout + res.stderr
        assert [mode(p) for p in (out, out / ".lazyfs", out / "models", out / P)] == [folder] * 4, store_mode
        assert mode(out / P / "w.bin") == file, store_mode


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A folder other users can reach (pytest's tmp tree is 0700), for a store
    read as user nobody, as a model server running as another user reads an
    image's."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        _unusable("acting as another user needs root and setpriv (util-linux)")
    top = Path(tempfile.mkdtemp(prefix="lazyfs-modes-"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def nobody_reads(path: Path) -> bytes | None:
    """The file's bytes as user nobody reads them; None where refused."""
    res = subprocess.run([*NOBODY, "cat", str(path)], capture_output=True, timeout=20)
    assert res.returncode == 0 or b"Permission denied" in res.stderr, res.stderr
    return res.stdout if res.returncode == 0 else None


def modes(store: Path, *paths: str) -> dict[str, int]:
    return {p: mode(store / p) for p in paths}


def test_a_bake_over_a_bake_makes_the_folders_follow_and_one_told_no_mode_keeps_the_stores(
        proxy, s3, bucket, reachable: Path):
    """A bake with --store-mode public over a private one made the files 0444
    but left every folder 0700: no other user reached them.  A bake without
    --store-mode over a public one made the files 0400 again: an image's
    non-root model server could no longer read them."""
    a, b, c = os.urandom(1000), os.urandom(1000), os.urandom(1000)
    s3.put_object(Bucket=bucket, Key=f"{P}/a.bin", Body=a)
    s3.put_object(Bucket=bucket, Key=f"{P}/sub/b.bin", Body=b)
    store = reachable / "image"
    folders = (".lazyfs", "models", P, f"{P}/sub")

    def bake(*flags: str) -> str:
        res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--to", str(store), "--endpoint-url",
                          proxy.endpoint, *flags])
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout + res.stderr

    bake()
    assert nobody_reads(store / P / "sub/b.bin") is None
    said = bake("--store-mode", "public")
    assert modes(store, ".", *folders) == dict.fromkeys((".", *folders), 0o755)
    assert modes(store, f"{P}/a.bin", f"{P}/sub/b.bin", ".lazyfs/layout") == dict.fromkeys(
        (f"{P}/a.bin", f"{P}/sub/b.bin", ".lazyfs/layout"), 0o444)
    assert (nobody_reads(store / P / "a.bin"), nobody_reads(store / P / "sub/b.bin")) == (a, b)
    assert f"store {store}: now public (it was private): 5 folders and 3 files given its modes" in said, said

    s3.put_object(Bucket=bucket, Key=f"{P}/new/c.bin", Body=c)
    said = bake()  # told no mode: the store's
    assert "1 downloaded" in said and "given its modes" not in said, said
    assert modes(store, f"{P}/new", f"{P}/new/c.bin", f"{P}/a.bin") == {
        f"{P}/new": 0o755, f"{P}/new/c.bin": 0o444, f"{P}/a.bin": 0o444}
    assert (nobody_reads(store / P / "new/c.bin"), nobody_reads(store / P / "sub/b.bin")) == (c, b)

    said = bake("--store-mode", "private")
    assert "now private (it was public)" in said, said
    assert modes(store, *folders, f"{P}/new") == dict.fromkeys((*folders, f"{P}/new"), 0o700)
    assert mode(store / P / "a.bin") == 0o400 and nobody_reads(store / P / "a.bin") is None
    assert mode(store) == 0o755, "the folder a bake was given is never narrowed"
    assert lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint, "--store",
                       str(store), "--require-all"]).returncode == 0


def test_a_mount_keeps_the_stores_mode_or_makes_the_store_follow_the_one_it_is_told(
        mount, proxy, s3, bucket, fs: FS, reachable: Path):
    """The same two cases through `lazyfs mount`: one without --store-mode
    over a public image fetched files private (0400), unreadable by the
    image's other users; one with --store-mode public over a private store
    made its new files 0444 in folders that stayed 0700."""
    a, c = os.urandom(1000), os.urandom(1000)
    s3.put_object(Bucket=bucket, Key=f"{P}/a.bin", Body=a)
    store = reachable / "image"
    res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--to", str(store), "--store-mode", "public",
                      "--endpoint-url", proxy.endpoint])
    assert res.returncode == 0, res.stdout + res.stderr
    s3.put_object(Bucket=bucket, Key=f"{P}/new/c.bin", Body=c)
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m.file(f"{P}/new/c.bin")) == c
    wait_until((store / P / "new/c.bin").exists, what="the download published")
    assert m.stop() == 0
    assert modes(store, f"{P}/new", f"{P}/new/c.bin") == {f"{P}/new": 0o755, f"{P}/new/c.bin": 0o444}
    assert nobody_reads(store / P / "new/c.bin") == c

    m = mount("--prefix", f"s3://{bucket}/{P}", "--store-mode", "private", store=store)
    assert "now private (it was public)" in m.log()
    assert modes(store, P, f"{P}/new", ".lazyfs") == dict.fromkeys((P, f"{P}/new", ".lazyfs"), 0o700)
    assert nobody_reads(store / P / "a.bin") is None
    assert fs.read(m.file(f"{P}/a.bin")) == a
    assert m.stop() == 0

    m = mount("--prefix", f"s3://{bucket}/{P}", "--store-mode", "public", store=store)
    assert "now public (it was private)" in m.log()
    assert (nobody_reads(store / P / "a.bin"), nobody_reads(store / P / "new/c.bin")) == (a, c)
    assert m.stop() == 0


def test_a_public_image_an_older_lazyfs_baked_stays_public(mount, proxy, s3, bucket, fs: FS, reachable: Path):
    """lazyfs before its layout followed --store-mode wrote .lazyfs/layout
    0600 whatever the mode, and 0600 was read as "private": a mount told no
    mode fetched files 0400 into an older public image (Permission denied to
    its non-root model server, whose `status --require-all` then said "not
    ready"), and a bake told none made the whole image private, saying
    "private (it was private)"."""
    a, c = os.urandom(1000), os.urandom(1000)
    s3.put_object(Bucket=bucket, Key=f"{P}/a.bin", Body=a)
    store = reachable / "image"

    def bake(*flags: str) -> str:
        res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--to", str(store), "--endpoint-url",
                          proxy.endpoint, *flags])
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout + res.stderr

    bake("--store-mode", "public")
    (store / ".lazyfs/layout").chmod(0o600)  # as an older lazyfs left it
    s3.put_object(Bucket=bucket, Key=f"{P}/new/c.bin", Body=c)
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m.file(f"{P}/new/c.bin")) == c
    wait_until((store / P / "new/c.bin").exists, what="the download published")
    assert m.stop() == 0
    assert modes(store, f"{P}/new", f"{P}/new/c.bin", ".lazyfs/layout") == {
        f"{P}/new": 0o755, f"{P}/new/c.bin": 0o444, ".lazyfs/layout": 0o444}
    assert nobody_reads(store / P / "new/c.bin") == c
    res = lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint, "--store",
                      str(store), "--require-all"], wrapper=NOBODY, cwd=reachable)  # the image's other user
    assert res.returncode == 0 and "2 cached" in res.stdout and "layout" not in res.stdout, res.stdout + res.stderr
    assert (f"store {store}: public, recorded now (.lazyfs/layout was 0600, which records no mode: an older lazyfs "
            f'wrote it so; found public: "{P}/a.bin" was open to anyone)') in m.log()

    (store / ".lazyfs/layout").chmod(0o600)
    said = bake()
    assert "public, recorded now" in said and "private" not in said, said
    assert modes(store, P, f"{P}/new", ".lazyfs") == dict.fromkeys((P, f"{P}/new", ".lazyfs"), 0o755)
    assert (nobody_reads(store / P / "a.bin"), nobody_reads(store / P / "new/c.bin")) == (a, c)


def test_a_change_of_mode_cut_short_is_finished_by_the_next_mount(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """An immutable file rightly stopped a mount told --store-mode private of
    a public store, but the change was left half made (files 0400 and 0444,
    folders 0755, the record public) and the next mount, told no mode,
    walked nothing; the error line told root, the file's owner, to run as
    the store's owner."""
    a, b = os.urandom(1000), os.urandom(1000)
    s3.put_object(Bucket=bucket, Key=f"{P}/a.bin", Body=a)
    s3.put_object(Bucket=bucket, Key=f"{P}/sub/b.bin", Body=b)
    store = tmp_path / "image"
    res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--to", str(store), "--store-mode", "public",
                      "--endpoint-url", proxy.endpoint])
    assert res.returncode == 0, res.stdout + res.stderr
    stuck = store / P / "sub/b.bin"
    res = subprocess.run(["chattr", "+i", str(stuck)], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:  # not root, no chattr, or a filesystem without the attribute (tmpfs)
        pytest.skip(f"chattr +i is refused here: {res.stderr.strip() or res.returncode}")
    try:
        with pytest.raises(MountFailed) as stopped:
            mount("--prefix", f"s3://{bucket}/{P}", "--store-mode", "private", store=store)
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], capture_output=True, timeout=30)
    assert mode(stuck) == 0o444 and mode(store / ".lazyfs/layout") == 0o444

    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert modes(store, f"{P}/a.bin", f"{P}/sub/b.bin", ".lazyfs/layout") == dict.fromkeys(
        (f"{P}/a.bin", f"{P}/sub/b.bin", ".lazyfs/layout"), 0o400)
    assert modes(store, "models", P, f"{P}/sub", ".lazyfs") == dict.fromkeys(("models", P, f"{P}/sub", ".lazyfs"),
                                                                            0o700)
    assert f"store {store}: now private (it was public; a change to private was cut short: finished now)" in m.log()
    assert fs.read(m.file(f"{P}/sub/b.bin")) == b
    assert m.stop() == 0
    assert str(stopped.value).startswith("lazyfs exited with 1")
    assert (f'lazyfs: error: cannot give "{P}/sub/b.bin" in store {store} mode 0400 (Operation not permitted): '
            f'not even its owner may change it, so it is immutable or append-only: lsattr "{stuck}" shows which '
            "(chattr -i or -a, as root, lifts it)") in str(stopped.value)


# -- identity without user xattrs --------------------------------------------------------------

def test_without_user_xattrs_a_retrained_checkpoint_of_the_same_size_is_fetched(
        mount, proxy, s3, bucket, fs: FS, tmp_path: Path, no_xattr_fs: Path):
    key = f"{P}/model.safetensors"
    v1, v2 = os.urandom(300_000), os.urandom(300_000)
    s3.put_object(Bucket=bucket, Key=key, Body=v1)
    store = no_xattr_fs / "store"
    args = ("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB")
    m = mount(*args, store=store)
    assert fs.read(m.file(key)) == v1
    published = store / key
    wait_until(published.exists, what="the download published")
    with pytest.raises(OSError) as refused:
        os.getxattr(published, "user.lazyfs.identity")
    assert refused.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
    assert (store / ".lazyfs" / "identities" / str(published.stat().st_ino)).exists()
    through = lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--store", str(m.path)])
    assert "1 cached" in through.stdout and "sidecar files" in through.stdout, through.stdout
    m.stop()

    s3.put_object(Bucket=bucket, Key=key, Body=v2)  # retrained: same size, new bytes
    res = status(proxy, bucket, store, "--require-all")
    assert res.returncode == 1 and "1 stale" in res.stdout, res.stdout + res.stderr
    assert "sidecar files" in res.stdout
    doctor = lazyfs_cli(["doctor", str(tmp_path), "--prefix", f"s3://{bucket}/{P}", "--store", str(store),
                         "--endpoint-url", proxy.endpoint])
    assert "warn  identity records:" in doctor.stdout and "sidecar files" in doctor.stdout, doctor.stdout
    gets = proxy.count("GET", key)
    m2 = mount(*args, store=store)
    assert fs.read(m2.file(key)) == v2, "the old checkpoint was served as current"
    assert proxy.count("GET", key) > gets
    # The read can end before the download is published: stop only once it is.
    wait_until(lambda: "1 cached" in lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--store",
                                                 str(m2.path)]).stdout, what="v2 published")
    m2.stop()
    assert status(proxy, bucket, store, "--require-all").returncode == 0


# -- status --require-all never says ready without knowing ----------------------------------

def test_require_all_through_a_mount_without_xattrs_is_not_ready(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    s3.put_object(Bucket=bucket, Key=f"{P}/a.bin", Body=b"a" * 1000)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--no-xattrs", store=store)
    res = lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--store", str(m.path), "--require-all"])
    assert res.returncode == 1, res.stdout
    assert f"not ready: the mount was started with --no-xattrs and cannot tell file states: ask its store " \
           f"(--store {store})" in res.stdout


@pytest.mark.log_errors("AccessDenied|Access Denied|access denied")
def test_require_all_when_the_first_listing_failed_is_not_ready(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    s3.put_object(Bucket=bucket, Key=f"{P}/a.bin", Body=b"a" * 1000)
    for i in range(100):  # more than the start-up check's page: the first listing asks again
        s3.put_object(Bucket=bucket, Key=f"{P}/fill/{i:03d}", Body=b"f")
    # The start-up probe lists fine; every request after it is refused.
    proxy.add(Fault("status", method="GET", skip=1, times=None, status=403, code="AccessDenied"))
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store")
    res = lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--store", str(m.path), "--require-all"])
    assert res.returncode == 1, res.stdout
    # Failed, or still being retried: either way no file is known.
    assert "(not ready: the mount has no listing:" in res.stdout or \
        "(not ready: the mount's first listing has not finished" in res.stdout, res.stdout


@pytest.fixture
def network_like_store(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A writable filesystem whose server can stop answering, as an NFS
    server can: bindfs (FUSE) over a folder; SIGSTOP its daemon to hang it."""
    try:
        apt_install(["bindfs"], ["bindfs"])
    except StoreUnavailable as e:
        _unusable(str(e))
    backing, path = tmp_path / "backing", tmp_path / "netfs"
    backing.mkdir()
    path.mkdir()
    daemon = subprocess.Popen(["bindfs", "-f", str(backing), str(path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: is_mounted(path), what="bindfs mounted")
        yield path, daemon
    finally:
        daemon.send_signal(signal.SIGCONT)
        lazyfs_cli(["umount", "--force", str(path)])  # what is left of it, whoever holds it
        daemon.kill()
        daemon.wait(10)


@pytest.mark.long
@pytest.mark.log_errors("the store did not answer within")
def test_df_and_the_stats_file_answer_while_the_store_filesystem_hangs(mount, proxy, s3, bucket, fs: FS,
                                                                       network_like_store):
    """`df` on the mount asks the store's filesystem for its size: a store
    whose server has stopped answering must not hang the mount with it (it
    hung the whole event loop: every other request of the mount waited).
    A file's state, which only the store can tell, fails with EIO after 5 s:
    a request the kernel has sent waits for its answer whatever signal its
    process gets, so `getfattr` or `lazyfs status` (a readiness probe) stuck
    on it could not even be killed.  An open that needs the store fails
    with EIO after --read-deadline, as a read waiting on S3 does."""
    netfs, daemon = network_like_store
    s3.put_object(Bucket=bucket, Key=f"{P}/w.bin", Body=b"w" * 5000)
    s3.put_object(Bucket=bucket, Key=f"{P}/x.bin", Body=b"x" * 5000)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--read-deadline", "3", store=netfs / "store")
    try:
        assert fs.read(m.file(f"{P}/w.bin")) == b"w" * 5000
        before = fs.run(os.statvfs, str(m.path))
        daemon.send_signal(signal.SIGSTOP)
        time.sleep(1.5)  # past the last answer's freshness: the next df asks again
        for _ in range(3):  # the first waits a second for the store; the others not at all
            st = fs.run(os.statvfs, str(m.path), timeout=10)
            assert (st.f_blocks, st.f_frsize) == (before.f_blocks, before.f_frsize)
        assert fs.listdir(m.path / P) == ["w.bin", "x.bin"]  # the rest of the mount answers
        shown = json.loads(fs.read(m.path / ".lazyfs" / "stats.json", timeout=10))
        assert shown["store_filesystem"]["size_bytes"] == before.f_blocks * before.f_frsize
        with pytest.raises(OSError) as info:
            fs.run(os.getxattr, str(m.file(f"{P}/x.bin")), "user.lazyfs.state", timeout=15)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            fs.read(m.file(f"{P}/x.bin"), timeout=15)
        assert info.value.errno == errno.EIO
        assert 'the store did not answer within 3 s about "models/m/x.bin"' in m.log()
        res = status(proxy, bucket, m.path, "--require-all")
        assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
        # Every file's state comes in one read of the mount's states file, which
        # only the store can answer (w.bin's too: its read ended once it was
        # published, lastbytes.py): EIO after 5 s, once, not 5 s per file.
        assert "(not ready: cannot read the mount's .lazyfs/states.json (Input/output error);" in res.stdout, \
            res.stdout + res.stderr
        assert "the store did not answer within 5 s about the states of 2 files" in m.log()
    finally:
        daemon.send_signal(signal.SIGCONT)
    assert m.process.stop() == 0


def test_sigterm_stops_the_mount_even_with_a_thread_stuck_in_a_store_that_hangs(mount, s3, bucket, fs: FS,
                                                                                 network_like_store):
    """An open stuck in the store's filesystem holds one of lazyfs's threads
    in the kernel for good.  SIGTERM must still end the process and leave no
    mount behind (it waited for that thread for ever: a container stop would
    have ended in SIGKILL and a mount that never answers).  The open gives
    its thread up when the stop cancels it; work that cannot, the last-stop
    timer ends (tests/unit/test_laststop.py)."""
    netfs, daemon = network_like_store
    s3.put_object(Bucket=bucket, Key=f"{P}/w.bin", Body=b"w" * 5000)
    m = mount("--prefix", f"s3://{bucket}/{P}", store=netfs / "store")
    fs.listdir(m.path / P)
    daemon.send_signal(signal.SIGSTOP)
    try:
        stuck = fs.start(lambda: m.file(f"{P}/w.bin").read_bytes())  # its open asks the store
        _stop_frees(m, stuck, (errno.ECONNABORTED, errno.ENOTCONN, errno.EIO))
    finally:
        daemon.send_signal(signal.SIGCONT)


def _stop_frees(m, stuck, errnos: tuple[int, ...]) -> None:
    """SIGTERM ends lazyfs (exit 0, nothing left mounted) although `stuck`, a
    reader, waits on the hung store; the reader then gets one of `errnos`."""
    time.sleep(1)
    assert not stuck.done()
    assert m.process.stop(timeout=40) == 0
    assert not is_mounted(m.path)
    with pytest.raises(OSError) as info:
        stuck.result(timeout=10)
    assert info.value.errno in errnos


@pytest.mark.long
def test_a_stop_held_by_work_that_cannot_be_cancelled_detaches_the_mount_and_exits(mount, s3, bucket, fs: FS,
                                                                                      network_like_store):
    """A read of a cached file whose pages must come from the store, once the
    store's filesystem has stopped answering, holds a thread trio cannot
    abandon.  The stop cannot finish; 15 s after SIGTERM the last-stop timer
    detaches the mount (the reader gets ECONNABORTED), says so, exits 0."""
    netfs, daemon = network_like_store
    data = os.urandom(3 << 20)
    s3.put_object(Bucket=bucket, Key=f"{P}/w.bin", Body=data)
    first = mount("--prefix", f"s3://{bucket}/{P}", store=netfs / "store")
    assert fs.read(first.file(f"{P}/w.bin")) == data
    wait_until((netfs / "store" / P / "w.bin").exists, what="the download published")
    assert first.process.stop() == 0
    drop_from_page_cache(netfs / "store" / P / "w.bin")
    drop_from_page_cache(netfs.parent / "backing" / "store" / P / "w.bin")
    m = mount("--prefix", f"s3://{bucket}/{P}", store=netfs / "store")
    fd = fs.run(os.open, str(m.file(f"{P}/w.bin")), os.O_RDONLY)  # the store answered this open
    daemon.send_signal(signal.SIGSTOP)
    try:
        stuck = fs.start(os.pread, fd, 1 << 20, 0)  # its pages must come from the store
        _stop_frees(m, stuck, (errno.ECONNABORTED, errno.ENOTCONN))
        assert "the stop did not finish in 15 s" in m.log() and f"detaching {m.path} and exiting" in m.log()
    finally:
        daemon.send_signal(signal.SIGCONT)
        try:
            os.close(fd)
        except OSError:
            pass


def _in_page_cache(path: Path, size: int) -> bool:
    """Whether all of the file reads without going to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(size)], 0, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@KERNEL_CACHES
@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_downloaded_bytes_reach_the_store_and_are_read_back_the_chosen_way(mode: str, mount, proxy, moto, bucket,
                                                                           fs: FS, tmp_path: Path):
    """--store-writes direct: the sweep's pieces go to the disk past the page
    cache (all but the file's unaligned tail), and verification reads an
    MD5-checked file back past it too (readback.py: its reader fills the page
    cache once, which costs less CPU than a copy out of newly filled pages);
    buffered: none go direct, and the copy stays cached.  Byte-exact and
    downloaded once either way."""
    key = f"{P}/w.bin"
    data = os.urandom(3 * 2**20 + 1000)
    s3_client(moto.endpoint, checksums=False).put_object(Bucket=bucket, Key=key, Body=data)  # checked by MD5
    store = tmp_path / "store"
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except OSError as e:
        pytest.skip(f"the test folder's filesystem refuses O_DIRECT ({e.strerror})")
    port = free_port()
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "1MiB", "--store-writes", mode, "--prefetch",
              "--metrics-port", str(port), store=store)
    wait_until(lambda: fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.state") == b"cached",
               what="the prefetched file published")
    direct = json.loads(fs.read(m.path / ".lazyfs" / "stats.json"))["s3"]["bytes_written_direct"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    [exported] = [float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("lazyfs_direct_write_bytes_total ")]
    assert exported == direct
    if mode == "buffered":
        assert direct == 0
    elif os.environ.get("LAZYFS_TEST_TRANSFER_CLIENT") == "crt":
        assert 0 < direct <= 3 * 2**20  # awscrt's chunks: whichever are aligned
    else:
        assert direct == 3 * 2**20  # every piece but the 1000-byte tail
    assert fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.verified") == b"MD5"
    if mode == "buffered":
        assert _in_page_cache(store / key, len(data)), "the published copy is not in the page cache"
    else:
        # (Until residency.py asked with cachestat, a chunk just written often passed
        # for cached, and the read-back pulled it in through the page cache.)
        assert not _in_page_cache(store / key, len(data)), "the read-back went through the page cache"
    assert (store / key).read_bytes() == data and fs.read(m.file(key)) == data
    assert proxy.bytes_sent(key) == len(data)


@pytest.mark.parametrize("algorithm", ["CRC64NVME", "CRC32"])
def test_a_file_with_a_crc_is_verified_without_reading_it_back(algorithm: str, mount, proxy, s3, bucket,
                                                              fs: FS, tmp_path: Path):
    """The CRC of each piece is taken as it is written and the CRCs are
    combined (piecesums.py): no byte of the file is read back to verify it, on
    either transfer client; an MD5-checked file is read back whole."""
    crc, md5 = f"{P}/crc.bin", f"{P}/md5.bin"
    data = os.urandom(5 * 2**20 + 4321)
    s3.put_object(Bucket=bucket, Key=crc, Body=data, ChecksumAlgorithm=algorithm)
    other = os.urandom(len(data))
    s3_client(s3.meta.endpoint_url, checksums=False).put_object(Bucket=bucket, Key=md5, Body=other)
    port = free_port()
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "1MiB", "--metrics-port", str(port),
              store=tmp_path / "store")

    def read_back() -> int:
        counted = int(json.loads(fs.read(m.path / ".lazyfs" / "stats.json"))["downloads"]["bytes_read_to_verify"])
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        [exported] = [float(line.split()[1]) for line in metrics.splitlines()
                      if line.startswith("lazyfs_verify_read_bytes_total ")]
        assert exported == counted
        return counted

    assert fs.read(m.file(crc)) == data
    wait_until(lambda: fs.run(os.getxattr, str(m.file(crc)), "user.lazyfs.state") == b"cached", what="publication")
    assert fs.run(os.getxattr, str(m.file(crc)), "user.lazyfs.verified") == algorithm.encode()
    assert read_back() == 0
    assert fs.read(m.file(md5)) == other
    wait_until(lambda: fs.run(os.getxattr, str(m.file(md5)), "user.lazyfs.state") == b"cached", what="publication")
    assert fs.run(os.getxattr, str(m.file(md5)), "user.lazyfs.verified") == b"MD5"
    assert read_back() == len(other)
    assert (tmp_path / "store" / crc).read_bytes() == data and proxy.bytes_sent(crc) == len(data)


def test_a_file_read_as_it_arrives_is_written_through_the_page_cache(mount, proxy, s3, bucket, fs: FS,
                                                                     tmp_path: Path):
    """lazyfs answers such reads from the page cache, so a download with a
    handle reading it writes buffered (with --store-writes direct, the
    default); bytes written direct would first have to come back from disk."""
    key = f"{P}/w.bin"
    data = os.urandom(4 * 2**20)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "1MiB", "--whole-file-open", "never",
              store=tmp_path / "store")
    assert fs.read(m.file(key)) == data
    wait_until(lambda: fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.state") == b"cached",
               what="the file published")
    direct = json.loads(fs.read(m.path / ".lazyfs" / "stats.json"))["s3"]["bytes_written_direct"]
    # At most what landed before the open registered its handle (a first piece or so).
    assert direct < len(data) // 4
    assert proxy.bytes_sent(key) == len(data)


# -- a folder left in the store where a file must now be published ----------------------


def refresh(m) -> None:
    """SIGHUP, then wait until the refresh has been applied."""
    before = m.log().count("listing changed")
    m.process.send(signal.SIGHUP)
    wait_until(lambda: m.log().count("listing changed") > before, what="the refresh")


def cached(fs: FS, m, key: str) -> bool:
    return fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.state") == b"cached"


def test_a_folder_of_files_no_longer_listed_makes_way_for_a_file(mount, proxy, s3, bucket, fs: FS,
                                                                  tmp_path: Path):
    """c/x cached, then c/x/y in its place (the store's c/x turns folder), then
    c/x again: before, every open of it downloaded it again, logged an ERROR
    ("a folder stands at ... in the store") and never left it ready."""
    x, y = f"{P}/x", f"{P}/x/y"
    first, below, again = os.urandom(4095), os.urandom(4096), os.urandom(4095)
    s3.put_object(Bucket=bucket, Key=x, Body=first)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", store=store)
    assert fs.read(m.file(x)) == first
    wait_until(lambda: cached(fs, m, x), what="c/x published")
    s3.delete_object(Bucket=bucket, Key=x)
    s3.put_object(Bucket=bucket, Key=y, Body=below)
    refresh(m)
    assert fs.read(m.file(y)) == below
    wait_until(lambda: cached(fs, m, y), what="c/x/y published")
    s3.delete_object(Bucket=bucket, Key=y)
    s3.put_object(Bucket=bucket, Key=x, Body=again)
    refresh(m)
    gets = proxy.count("GET", x)
    assert fs.read(m.file(x)) == again
    wait_until(lambda: cached(fs, m, x), what="c/x published over the folder")
    assert (store / x).read_bytes() == again
    assert fs.read(m.file(x)) == again
    assert proxy.count("GET", x) == gets + 1, "the second open fetched it again"
    assert 'removed the folder at "models/m/x" in the store' in m.log()
    m.stop()
    assert status(proxy, bucket, store, "--require-all").returncode == 0


def test_a_folder_holding_an_admins_file_stays_and_says_so_once(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """The folder in the way holds a copy lazyfs did not fetch: it stays, and
    the file is served without being kept, with one warning, not an ERROR per
    open."""
    x = f"{P}/x"
    data = os.urandom(4095)
    s3.put_object(Bucket=bucket, Key=x, Body=data)
    store = tmp_path / "store"
    (store / P / "x").mkdir(parents=True)
    (store / P / "x" / "admin.txt").write_bytes(b"put here by hand")
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)

    def state() -> bytes:
        return fs.run(os.getxattr, str(m.file(x)), "user.lazyfs.state")

    for fetches in (1, 2):
        assert fs.read(m.file(x)) == data
        # Not kept: an open after the last download fetches it again (while
        # the kernel may answer the read from the pages it cached).
        wait_until(lambda fetches=fetches: proxy.count("GET", x) == fetches, what=f"fetch {fetches}")
        wait_until(lambda: state() == b"missing", what="the download over, and not kept")
    assert (store / P / "x" / "admin.txt").read_bytes() == b"put here by hand"
    assert m.log().count('a folder stands at "models/m/x" in the store and is kept') == 1


def test_bake_replaces_a_folder_of_fetched_files_no_longer_listed(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    x, y = f"{P}/x", f"{P}/x/y"
    below, again = os.urandom(4096), os.urandom(4095)
    s3.put_object(Bucket=bucket, Key=y, Body=below)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m.file(y)) == below
    wait_until(lambda: cached(fs, m, y), what="c/x/y published")
    m.stop()
    s3.delete_object(Bucket=bucket, Key=y)
    s3.put_object(Bucket=bucket, Key=x, Body=again)
    res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                      "--to", str(store)], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (store / x).read_bytes() == again
    assert status(proxy, bucket, store, "--require-all").returncode == 0


def test_bake_fails_a_file_a_kept_folder_stands_in_the_way_of(proxy, s3, bucket, tmp_path: Path):
    z = f"{P}/z"
    s3.put_object(Bucket=bucket, Key=z, Body=b"a file")
    store = tmp_path / "store"
    (store / z).mkdir(parents=True)
    (store / z / "admin.txt").write_bytes(b"put here by hand")
    res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                      "--to", str(store)], timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f'failed: "s3://{bucket}/{z}"' in res.stdout and "not kept in the store" in res.stdout, res.stdout
    assert 'a folder stands at "models/m/z" in the store and is kept' in res.stderr, res.stderr
    assert (store / z / "admin.txt").read_bytes() == b"put here by hand"


# -- a key too long for an identity record in an xattr ----------------------------------------

def _read_deep(root: Path, key: str) -> tuple[bytes, str]:
    """A file's bytes and user.lazyfs.state, opened component by component
    (its path is longer than PATH_MAX)."""
    *folders, name = key.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for folder in folders:
            fd, parent = os.open(folder, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent)
        f = os.open(name, os.O_RDONLY, dir_fd=fd)
        try:
            data = b""
            while chunk := os.read(f, 1 << 20):
                data += chunk
            return data, os.getxattr(f, "user.lazyfs.state").decode()
        finally:
            os.close(f)
    finally:
        os.close(fd)


def test_a_key_too_long_for_an_identity_xattr_is_kept_and_served(mount, proxy, s3, bucket, fs: FS,
                                                                  tmp_path: Path):
    """A key of 5,000 bytes (S3 caps keys at 1,024, other stores need not):
    its identity record does not fit in an ext4 file's xattr block, and
    publishing failed with "No space left on device" on a disk far from
    full.  The record goes to a sidecar: the file is kept and served."""
    key = f"{P}/" + "/".join(["d" * 200] * 25) + "/deep.bin"
    s3.put_object(Bucket=bucket, Key=key, Body=b"deep bytes")
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.run(_read_deep, m.path, key)[0] == b"deep bytes"
    wait_until(lambda: fs.run(_read_deep, m.path, key)[1] == "cached", what="the file published")
    assert "No space left" not in m.log()
    assert "does not fit in the extended attributes" in m.log()
    m.stop()
    gets = proxy.count("GET", key)
    m2 = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.run(_read_deep, m2.path, key) == (b"deep bytes", "cached")
    assert proxy.count("GET", key) == gets, "fetched again after a restart"


# -- a file deleted from the store frees its space ---------------------------------------------

def test_a_file_deleted_from_the_store_frees_its_space_at_the_next_start(mount, proxy, s3, bucket, fs: FS,
                                                                          tmp_path: Path):
    """`rm store/.../ten.bin` freed nothing: the content index
    (.lazyfs/objects/) still held a hard link to it.  The next mount's sweep
    removes entries nothing else links to, and never one a file still uses."""
    s3.put_object(Bucket=bucket, Key=f"{P}/ten.bin", Body=b"t" * 300_000)
    s3.put_object(Bucket=bucket, Key=f"{P}/kept.bin", Body=b"k" * 300_000)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    for name in ("ten.bin", "kept.bin"):
        assert fs.read(m.file(f"{P}/{name}")) == name[0].encode() * 300_000
        wait_until((store / P / name).exists, what=f"{name} published")
    m.stop()
    objects = store / ".lazyfs" / "objects"
    entries = {p.name: p.stat().st_ino for p in objects.iterdir()}
    assert len(entries) == 2
    (store / P / "ten.bin").unlink()  # an operator freeing space
    m2 = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    wait_until(lambda: "store sweep: freed" in m2.log(), what="the store sweep")
    assert {p.stat().st_ino for p in objects.iterdir()} == {(store / P / "kept.bin").stat().st_ino}
    assert fs.read(m2.file(f"{P}/kept.bin")) == b"k" * 300_000
