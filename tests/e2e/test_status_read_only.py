"""End to end: `lazyfs status` only reads.  A store on a read-only filesystem
(a production image run `--read-only`), or one the caller may read but not
write (a monitoring user's probe), is judged as a writable one, with nothing
written into it; a mount the caller may not read is one error line, exit 1,
not a table of "0 files".
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from support.mounting import FS, lazyfs_cli

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind-mount and to act as another user")]

P = "models/m"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
FILES = {f"{P}/config.json": b"{}" * 50, f"{P}/w.safetensors": os.urandom(300_000)}


@pytest.fixture
def public() -> Iterator[Path]:
    """A folder outside pytest's private tmp tree (0700), so that user
    nobody can reach what is in it; whatever a test mounted in it is
    unmounted, whatever happened."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to act as another user")
    top = Path(tempfile.mkdtemp(prefix="lazyfs-ro-"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        _unmount_under(top)
        shutil.rmtree(top, ignore_errors=True)


def _unmount_under(top: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in reversed(points):  # the last mounted first
        if point == str(top) or point.startswith(f"{top}/"):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


@contextlib.contextmanager
def read_only_view(store: Path, view: Path) -> Iterator[Path]:
    """`store` seen through a read-only bind mount at `view` (as an image's
    store is in a container run with --read-only)."""
    view.mkdir()
    subprocess.run(["mount", "--bind", str(store), str(view)], check=True, capture_output=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True, capture_output=True,
                       timeout=30)
        with pytest.raises(OSError) as refused:
            (view / "probe").write_bytes(b"")
        assert refused.value.errno == errno.EROFS
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True, timeout=30)


def _bake(proxy, s3, bucket: str, store: Path, lock: Path) -> None:
    for key, body in FILES.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--to", str(store), "--store-mode", "public",
                      "--write-lock", str(lock), "--endpoint-url", proxy.endpoint])
    assert res.returncode == 0, res.stdout + res.stderr
    lock.chmod(0o644)


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path in the store, with its mode, size and mtime: what a look must not change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _status_forms(proxy, bucket: str, store: Path, lock: Path) -> list[list[str]]:
    return [["status", "--prefix", f"s3://{bucket}/{P}", "--store", str(store), "--require-all",
             "--endpoint-url", proxy.endpoint],
            ["status", "--lock", str(lock), "--store", str(store), "--require-all"],
            ["status", "--lock", str(lock), "--store", str(store), "--require-all", "--verify", "content"]]


def _assert_ready(res: subprocess.CompletedProcess[str], form: list[str]) -> None:
    assert res.returncode == 0, (form, res.stdout, res.stderr)
    assert res.stderr == "", (form, res.stderr)
    summary = res.stdout.splitlines()[-1]
    assert summary.startswith("2 files,") and "2 cached" in summary and "(ready" in summary, summary


def test_status_judges_a_read_only_store_and_writes_nothing(proxy, s3, bucket, public: Path):
    store, lock = public / "store", public / "model.lock.json"
    _bake(proxy, s3, bucket, store, lock)
    before = _tree(store)
    with read_only_view(store, public / "ro") as view:
        for form in _status_forms(proxy, bucket, view, lock):
            _assert_ready(lazyfs_cli(form), form)
    assert _tree(store) == before


def test_status_judges_a_store_the_caller_may_read_but_not_write(proxy, s3, bucket, public: Path):
    store, lock = public / "store", public / "model.lock.json"
    _bake(proxy, s3, bucket, store, lock)
    before = _tree(store)
    for form in _status_forms(proxy, bucket, store, lock):
        _assert_ready(lazyfs_cli(form, wrapper=NOBODY, cwd=public), form)
    assert _tree(store) == before


@pytest.fixture
def ramfs(public: Path) -> Path:
    """A filesystem that keeps no user xattrs on any kernel (identity records
    go to sidecar files); unmounted by `public`."""
    path = public / "ramfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0755", "ramfs", str(path)], check=True,
                   capture_output=True, timeout=30)
    with pytest.raises(OSError):
        os.setxattr(path, "user.x", b"1")
    return path


def test_status_reads_sidecar_records_of_a_store_it_may_not_write(proxy, s3, bucket, public: Path, ramfs: Path):
    store, lock = ramfs / "store", public / "model.lock.json"
    _bake(proxy, s3, bucket, store, lock)
    assert any((store / ".lazyfs/identities").iterdir()), "the bake kept no sidecar records"
    before = _tree(store)
    with read_only_view(store, public / "ro") as view:
        for form in _status_forms(proxy, bucket, view, lock):
            res = lazyfs_cli(form)
            _assert_ready(res, form)
            assert "identity records in sidecar files" in res.stdout or "--lock" in form
    for form in _status_forms(proxy, bucket, store, lock):
        _assert_ready(lazyfs_cli(form, wrapper=NOBODY, cwd=public), form)
    assert _tree(store) == before
    # Records this user may not read (a store made private): not ready, saying why.
    (store / ".lazyfs/identities").chmod(0o700)
    res = lazyfs_cli(_status_forms(proxy, bucket, store, lock)[1], wrapper=NOBODY, cwd=public)
    assert res.returncode == 1 and res.stderr == "", res.stdout + res.stderr
    assert ("not ready: the identity records in .lazyfs/identities cannot be read by this user "
            "(Permission denied)") in res.stdout, res.stdout


def test_status_of_a_mount_the_caller_may_not_read_is_one_error(public: Path, mount, s3, bucket, fs: FS):
    for key, body in FILES.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    m = mount("--prefix", f"s3://{bucket}/{P}", mountpoint=public / "mnt", store=public / "store")
    assert fs.read(m.file(f"{P}/config.json")) == FILES[f"{P}/config.json"]
    for extra in ([], ["--require-all"], ["--json"]):
        res = lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--store", str(m.path), *extra],
                         wrapper=NOBODY, cwd=public)
        assert res.returncode == 1 and res.stdout == "", (extra, res.stdout, res.stderr)
        line, = res.stderr.splitlines()
        assert line.startswith(f"lazyfs: error: cannot read the lazyfs mount at {m.path} as this user "
                               "(Permission denied)") and "--allow-other" in line, line
