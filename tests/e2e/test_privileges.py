"""Least privilege: a mount needs /dev/fuse and CAP_SYS_ADMIN, nothing more.

A root process whose capabilities are cut down to SYS_ADMIN is the faithful
stand-in for a container started with `--device /dev/fuse --cap-add
SYS_ADMIN` minus the engine's defaults, or a pod with `drop: [ALL]` plus
`add: [SYS_ADMIN]`: no CAP_DAC_OVERRIDE (read-only files stay read-only to
their owner), no CAP_SYS_NICE (a raised nice value cannot be lowered again),
no CAP_FOWNER or CAP_CHOWN.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, on_both_clients, wait_until

pytestmark = pytest.mark.fuse

ONLY_SYS_ADMIN = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all,+sys_admin", "--"]


@pytest.fixture
def setpriv() -> list[str]:
    if shutil.which("setpriv") is None:
        if os.environ.get("CI"):
            pytest.fail("setpriv (util-linux) is needed for the least-privilege tests")
        pytest.skip("setpriv is not installed")
    return ONLY_SYS_ADMIN


@on_both_clients
def test_a_mount_with_only_sys_admin_caches_and_serves(mount, proxy, s3, bucket, fs: FS, tmp_path: Path,
                                                       setpriv: list[str]):
    data = os.urandom(3 * 1024 * 1024 + 17)
    s3.put_object(Bucket=bucket, Key="models/m/w.bin", Body=data)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/models/m", store=store, wrapper=setpriv)
    status = Path(f"/proc/{m.process.pid}/status").read_text()
    assert "CapEff:\t0000000000200000" in status, "the daemon kept more than CAP_SYS_ADMIN"
    assert hashlib.sha256(fs.read(m.file("models/m/w.bin"))).digest() == hashlib.sha256(data).digest()
    # Published, with its identity: a restart serves it without a GET.
    published = store / "models/m/w.bin"
    wait_until(published.exists, what="the download published in the store")
    assert os.getxattr(published, "user.lazyfs.identity")
    m.stop()
    gets = proxy.count("GET", "models/m/w.bin")
    m2 = mount("--prefix", f"s3://{bucket}/models/m", store=store, wrapper=setpriv)
    assert fs.read(m2.file("models/m/w.bin")) == data
    assert proxy.count("GET", "models/m/w.bin") == gets
    assert "Permission denied" not in m.log() + m2.log()


def test_bake_with_only_sys_admin_writes_a_usable_store(proxy, s3, bucket, tmp_path: Path, setpriv: list[str]):
    s3.put_object(Bucket=bucket, Key="models/m/a.bin", Body=b"a" * 100_000)
    s3.put_object(Bucket=bucket, Key="models/m/b.bin", Body=b"b" * 5)
    out = tmp_path / "baked"
    res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/models/m", "--to", str(out),
                      "--endpoint-url", proxy.endpoint], wrapper=setpriv)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 downloaded" in res.stdout and "0 failed" in res.stdout
    assert (out / "models/m/a.bin").read_bytes() == b"a" * 100_000
    assert os.getxattr(out / "models/m/b.bin", "user.lazyfs.identity")


def test_with_only_sys_admin_a_start_takes_over_a_hung_mount_and_umount_force_works(
        mount, s3, bucket, fs: FS, setpriv: list[str]):
    s3.put_object(Bucket=bucket, Key="models/m/a.txt", Body=b"a")
    m = mount("--prefix", f"s3://{bucket}/models/m", wrapper=setpriv)
    m.process.send(signal.SIGSTOP)
    try:
        m2 = mount("--prefix", f"s3://{bucket}/models/m", mountpoint=m.path, wrapper=setpriv)
        assert fs.read(m2.file("models/m/a.txt")) == b"a"
    finally:
        m.process.send(signal.SIGCONT)
    assert m.process.proc.wait(15) == 0
    res = lazyfs_cli(["umount", "--force", str(m2.path)], wrapper=setpriv)
    assert res.returncode == 0, res.stderr
    assert m2.process.proc.wait(15) == 0
    assert "Operation not permitted" not in m.log() + m2.log()
