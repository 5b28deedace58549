"""End to end (storeheal.py): the store's folders removed by an operator
under a running mount.  Before, every file not yet on disk answered ENOENT
("cannot lock the download in the store: No such file or directory") until a
restart, SIGHUP and refreshes notwithstanding, while `ls` listed it: what a
model loader takes for an optional file absent."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from support.mounting import FS, on_both_clients
from support.storefiles import rm_rf

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/m"


def read_errno(fs: FS, path: Path) -> int:
    try:
        fs.read(path)
    except OSError as e:
        return e.errno or 0
    return 0


@pytest.fixture
def files(s3, bucket) -> dict[str, bytes]:
    out = {f"{P}/{n}.bin": os.urandom(300_000 + i) for i, n in enumerate("abcde")}
    for key, data in out.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    return out


@pytest.mark.parametrize("removed", [".lazyfs/tmp", ".lazyfs", "*"])
def test_files_not_on_disk_are_fetched_after_the_stores_folders_were_removed(mount, bucket, files, fs: FS,
                                                                            tmp_path: Path, removed: str):
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    assert fs.read(m.file(f"{P}/a.bin")) == files[f"{P}/a.bin"]
    for path in store.glob(removed):
        rm_rf(path)
    for n in "bca":
        assert fs.read(m.file(f"{P}/{n}.bin")) == files[f"{P}/{n}.bin"]
    assert (store / P / "b.bin").read_bytes() == files[f"{P}/b.bin"], "kept in the store again"
    assert "was removed under the mount; made again" in m.log()


@pytest.mark.log_errors(r"the store's folder .* was removed under the mount \(nothing is there now\)")
def test_the_store_removed_is_eio_saying_so_until_it_is_there_again(mount, bucket, files, fs: FS, tmp_path: Path):
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    with fs.run(open, m.file(f"{P}/a.bin"), "rb") as held:
        assert fs.read(m.file(f"{P}/a.bin")) == files[f"{P}/a.bin"]
        rm_rf(store)
        assert read_errno(fs, m.file(f"{P}/b.bin")) == errno.EIO, "never ENOENT for a listed file"
        assert "b.bin" in fs.listdir(m.path / P)
        assert f"the store's folder {store} was removed under the mount (nothing is there now)" in m.log()
        store.mkdir()  # the operator makes it again
        assert fs.read(m.file(f"{P}/b.bin")) == files[f"{P}/b.bin"]
        assert fs.read(m.file(f"{P}/a.bin")) == files[f"{P}/a.bin"], "fetched again"
        assert (store / P / "b.bin").read_bytes() == files[f"{P}/b.bin"]
        assert f"the store's folder {store} was removed under the mount; using the folder there now" in m.log()
        assert fs.run(held.read) == files[f"{P}/a.bin"], "a handle open across it reads on"
