"""Unit tests (storeheal.py): the store's folders removed under a running
mount (`rm -rf STORE/.lazyfs/tmp`, `.lazyfs`, `STORE/*`, `STORE`) are made
again at the next download, or the store moves to a folder made again at
its path; with nothing there, a download fails with EIO and a line saying the
store's folder was removed.  Before, every download failed with ENOENT
("cannot lock the download in the store") until a restart."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lazyfs.errors import StoreError, errno_of
from lazyfs.filestate import FileState
from lazyfs.namespace import RemoteObject
from lazyfs.probe import Fetch, Local, probe_store
from lazyfs.store import Store
from support.filesystems import mounted


def obj(key: str, data: bytes) -> RemoteObject:
    return RemoteObject("bkt", key, len(data), hashlib.md5(data).hexdigest(), 1_700_000_000 * 10**9)


def fetch(store: Store, o: RemoteObject, data: bytes) -> bool:
    """What a download does in the store: probe (lock, sparse file), write, publish, unlock."""
    verdict = probe_store(store, o, may_fetch=True, open_partial=True, block_size=4, check_prebaked=None,
                          may_link=True)
    if isinstance(verdict, Local):  # linked from the same bytes under another path
        os.close(verdict.copy.fd)
        return True
    assert isinstance(verdict, Fetch) and verdict.partial is not None
    try:
        os.pwrite(verdict.partial.fd, data, 0)
        return store.publish(verdict.partial)
    finally:
        verdict.partial.close()
        store.partials.unlock(o, verdict.lock_fd)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def opened(root: Path):
    root.mkdir()
    s = Store.open(str(root))
    yield s
    s.close()


@pytest.mark.parametrize("removed", [".lazyfs/tmp", ".lazyfs/objects", ".lazyfs", "*"])
def test_a_download_after_the_stores_folders_were_removed_makes_them_again(opened: Store, root: Path,
                                                                          removed: str) -> None:
    a, b = b"a" * 10, b"b" * 12
    assert fetch(opened, obj("m/a.bin", a), a)
    for path in root.glob(removed):
        shutil.rmtree(path)
    assert fetch(opened, obj("m/b.bin", b), b)
    assert (root / "m/b.bin").read_bytes() == b
    assert (root / ".lazyfs/layout").read_text() == "1\n"
    assert fetch(opened, obj("n/a.bin", a), a), "linked from the content index, or fetched"
    assert (root / "n/a.bin").read_bytes() == a


def test_the_store_removed_with_nothing_at_its_path_is_eio_saying_so(opened: Store, root: Path) -> None:
    a = b"a" * 10
    shutil.rmtree(root)
    with pytest.raises(StoreError) as e:
        fetch(opened, obj("m/a.bin", a), a)
    assert errno_of(e.value) == errno.EIO
    assert str(e.value) == (f'"s3://bkt/m/a.bin": the store\'s folder {root} was removed under the mount (nothing '
                            f"is there now): files not on disk cannot be fetched until the folder is there again")


def test_the_store_made_again_at_its_path_is_used(opened: Store, root: Path) -> None:
    a = b"a" * 10
    shutil.rmtree(root)
    root.mkdir()
    assert fetch(opened, obj("m/a.bin", a), a)
    assert (root / "m/a.bin").read_bytes() == a
    assert opened.find_current(obj("m/a.bin", a)) is not None


def test_the_store_moved_to_a_filesystem_without_xattrs_keeps_its_records_beside_its_files(
        opened: Store, root: Path) -> None:
    """The store's folder removed, and a volume mounted at its path whose
    filesystem refuses user xattrs (ramfs here; tmpfs before 6.6, many NFS
    exports): whether records go in xattrs was asked at start only, so the
    store said it kept them (stats, metrics) and read the records of the
    files a store made there holds nowhere but in xattrs: every such file
    judged an unknown copy.  Asked again on the move, as at start."""
    a, b = b"a" * 10, b"b" * 12
    assert fetch(opened, obj("m/a.bin", a), a) and opened.identities.supported
    shutil.rmtree(root)
    with mounted(root, "ramfs", "mode=0755", "this test"):
        there = Store.open(str(root))  # a store made on the volume before (a bake): its records are sidecars
        try:
            assert fetch(there, obj("m/b.bin", b), b) and not there.identities.supported
        finally:
            there.close()
        opened.healer.check()
        assert opened.identities.supported is False, "the new folder's filesystem refuses user xattrs"
        assert opened.local_state(obj("m/b.bin", b)).state is FileState.CACHED, "the store made there: its record read"
        assert fetch(opened, obj("m/a.bin", a), a)
        assert opened.local_state(obj("m/a.bin", a)).state is FileState.CACHED
        assert len(list((root / ".lazyfs/identities").iterdir())) == 2


def test_the_store_replaced_by_a_symlink_follows_it_as_at_start_and_says_where(
        opened: Store, root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A symlink at the store's path is followed at start (`/var/cache ->
    /mnt/disk/cache`, a common deployment), and so by the healer: an operator
    moving the store to a bigger disk (`mv`, `ln -s`) gets what a restart
    would give.  Its line says where the path leads now."""
    a = b"a" * 10
    shutil.rmtree(root)
    disk = tmp_path / "disk"
    disk.mkdir()
    root.symlink_to(disk)
    assert fetch(opened, obj("m/a.bin", a), a)
    assert (disk / "m/a.bin").read_bytes() == a
    assert f"store: the store's folder {root} was removed under the mount; using the folder there now (a symlink " \
           f"to {disk}) (files not in it are fetched again when opened)" in caplog.text


def test_the_store_replaced_by_a_symlink_to_a_read_only_folder_is_not_used(
        opened: Store, root: Path, tmp_path: Path) -> None:
    """Start refuses a store on a read-only filesystem (EROFS); the healer
    moved to one and read its files: a copy there was judged (and would be
    served) as the store's, and a symlink into the mount itself had the
    store's reads ask the mount.  Refused, with a line saying why."""
    a = b"a" * 10
    with mounted(tmp_path / "ro", "tmpfs", "size=4m,mode=0755", "this test") as ro:
        (ro / "m").mkdir()
        (ro / "m/a.bin").write_bytes(a)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, capture_output=True, timeout=30)
        shutil.rmtree(root)
        root.symlink_to(ro)
        with pytest.raises(StoreError) as e:
            fetch(opened, obj("m/a.bin", a), a)
        assert errno_of(e.value) == errno.EIO
        assert str(e.value) == (f'"s3://bkt/m/a.bin": the store\'s folder {root} was removed under the mount, and the '
                                f"folder there now (a symlink to {ro}) is on a read-only filesystem: files not on disk "
                                f"cannot be fetched until a writable folder is there again")
        assert opened.local_state(obj("m/a.bin", a)).state is not FileState.PREBAKED
    root.unlink()
    root.mkdir()
    assert fetch(opened, obj("m/a.bin", a), a), "a writable folder there again: used"


def test_a_download_whose_file_was_removed_is_served_not_kept(opened: Store, root: Path) -> None:
    """Its readers have the file open (the download's descriptor): publish keeps nothing, raises nothing."""
    a = b"a" * 10
    o = obj("m/a.bin", a)
    verdict = probe_store(opened, o, may_fetch=True, open_partial=True, block_size=4, check_prebaked=None,
                          may_link=True)
    assert isinstance(verdict, Fetch) and verdict.partial is not None
    try:
        os.pwrite(verdict.partial.fd, a, 0)
        shutil.rmtree(root / ".lazyfs/tmp")
        assert opened.publish(verdict.partial) is False
        assert os.pread(verdict.partial.fd, 10, 0) == a
    finally:
        verdict.partial.close()
        opened.partials.unlock(o, verdict.lock_fd)
    assert not (root / "m/a.bin").exists()
    assert fetch(opened, o, a)


def test_a_store_error_of_a_missing_store_file_is_never_enoent_to_a_reader() -> None:
    """A loader takes ENOENT for "this optional file is absent"."""
    assert errno_of(StoreError("cannot lock the download in the store: No such file or directory",
                               errno.ENOENT)) == errno.EIO


def test_an_eviction_after_tmp_was_removed_evicts(opened: Store, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its publish lock is in tmp/: `could not evict ...: No such file or directory`, before."""
    a = b"a" * 10
    assert fetch(opened, obj("m/a.bin", a), a)
    shutil.rmtree(root / ".lazyfs/tmp")
    assert opened.evict(["m/a.bin"]) == 10
    assert not (root / "m/a.bin").exists()
    shutil.rmtree(root)
    assert opened.evict(["m/a.bin"]) == 0
    assert not [r for r in caplog.records if r.name == "lazyfs.storeevict"], caplog.text


def test_a_lock_taken_before_tmp_was_removed_never_unlinks_the_next_ones(opened: Store, root: Path) -> None:
    """Its unlock removed the name in tmp/ made again: another download's lock
    of the same version, which a third could then take beside it."""
    o = obj("m/a.bin", b"a" * 10)
    old = opened.partials.lock(o)
    assert old is not None
    shutil.rmtree(root / ".lazyfs/tmp")
    opened.healer.check()
    new = opened.partials.lock(o)
    assert new is not None
    opened.partials.unlock(o, old)
    assert opened.partials.lock(o) is None, "the new download's lock was unlinked under it"
    opened.partials.unlock(o, new)
