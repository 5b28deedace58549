"""End to end (issue 11): the store on disk as other users and other
filesystems see it: who may read it beneath the mount (--store-mode)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, wait_until

pytestmark = pytest.mark.fuse

P = "models/m"


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
