"""Unit tests: the on-disk store under a directory descriptor."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from lazyfs import verify
from lazyfs.errors import IntegrityError, StoreError
from lazyfs.filestate import FileState
from lazyfs.identity import IDENTITY_XATTR, Identity
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store
from support.storefiles import current_state
from support.storefiles import publish as download


def obj(key: str, data: bytes, etag: str | None = None) -> RemoteObject:
    return RemoteObject("bkt", key, len(data), etag or hashlib.md5(data).hexdigest(), 1_700_000_000 * 10**9)




def test_layout_and_private_tmp(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "store"
    assert (root / ".lazyfs" / "layout").read_text().strip() == "1"
    assert stat.S_IMODE((root / ".lazyfs" / "tmp").stat().st_mode) == 0o700


@pytest.mark.parametrize("mode, folder, file", [(None, 0o700, 0o400), ("private", 0o700, 0o400),
                                                ("group", 0o750, 0o440), ("public", 0o755, 0o444)])
def test_what_lazyfs_creates_in_a_store_is_private_unless_asked(tmp_path: Path, mode: str | None, folder: int,
                                                                 file: int) -> None:
    root = tmp_path / "new-store"
    old_umask = os.umask(0o077)  # --store-mode says what others may do, not the umask
    try:
        s = Store.open(str(root), create=True) if mode is None else Store.open(str(root), mode=mode, create=True)
        try:
            download(s, obj("models/m/w.bin", b"weights"), b"weights")
            s.listings.save("bkt", "models/m", [])
        finally:
            s.close()
    finally:
        os.umask(old_umask)
    for path in (root, root / "models", root / "models/m", root / ".lazyfs"):
        assert stat.S_IMODE(path.stat().st_mode) == folder, path
    for meta in ("tmp", "objects", "listings"):
        assert stat.S_IMODE((root / ".lazyfs" / meta).stat().st_mode) == 0o700, meta
    assert stat.S_IMODE((root / "models/m/w.bin").stat().st_mode) == file
    assert stat.S_IMODE((root / ".lazyfs/layout").stat().st_mode) == file  # whoever judges the files reads it


def test_publish_records_identity_and_find_current(store: Store, tmp_path: Path) -> None:
    data = b"hello world"
    o = obj("a/b/c.txt", data)
    assert store.find_current(o) is None
    download(store, o, data)
    path = tmp_path / "store" / "a/b/c.txt"
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert path.stat().st_mtime_ns == o.mtime_ns
    ident = Identity.decode(os.getxattr(path, IDENTITY_XATTR))
    assert ident == dataclasses.replace(Identity.of(o), file_mtime_ns=o.mtime_ns), "and the file's mtime as set"
    copy = store.find_current(o)
    assert copy is not None and copy.state == "cached"
    os.close(copy.fd)
    # Same size, other ETag: the record says it is another version.
    assert store.find_current(obj("a/b/c.txt", b"hello WORLD")) is None
    assert [p.name for p in (tmp_path / "store" / ".lazyfs" / "tmp").iterdir()] == ["publish.lock"]


def test_a_record_an_older_lazyfs_wrote_says_its_check_is_unknown(store: Store, tmp_path: Path) -> None:
    # Records written before they said how a copy was checked have no "verified" (nor file_mtime_ns):
    # the copy is served, and user.lazyfs.verified says "unknown", never "" (which means still downloading).
    data = b"from an older lazyfs"
    o = obj("old/w.bin", data)
    download(store, o, data)
    path = tmp_path / "store" / "old/w.bin"
    os.chmod(path, 0o600)
    os.setxattr(path, IDENTITY_XATTR, Identity.of(o).encode())
    os.chmod(path, 0o400)
    assert b"verified" not in os.getxattr(path, IDENTITY_XATTR)
    local = store.local_state(o)
    assert (local.state, local.verified) == (FileState.CACHED, "unknown")


def test_unrecorded_copy_is_judged_by_size(store: Store, tmp_path: Path) -> None:
    (tmp_path / "store" / "m").mkdir()
    (tmp_path / "store" / "m" / "w.bin").write_bytes(b"12345")
    copy = store.find_current(obj("m/w.bin", b"abcde"))
    assert copy is not None and copy.state == "prebaked"
    os.close(copy.fd)
    assert store.find_current(obj("m/w.bin", b"abcdef")) is None


def test_prebaked_layers_are_searched_after_the_store(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    layer = tmp_path / "layer"
    (layer / "m").mkdir(parents=True)
    (layer / "m" / "x").write_bytes(b"xyz")
    s = Store.open(str(tmp_path / "s"), [str(layer)])
    try:
        copy = s.find_current(obj("m/x", b"abc"))
        assert copy is not None and copy.state == "prebaked" and copy.layer.label == "prebaked layer"
        os.close(copy.fd)
    finally:
        s.close()


def test_symlinks_are_never_followed(store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret").write_bytes(b"secret")
    (outside / "sub" / "f").write_bytes(b"secret")
    root = tmp_path / "store"
    os.symlink(outside / "secret", root / "link")
    os.symlink(outside / "sub", root / "dirlink")
    assert store.find_current(obj("link", b"secret")) is None
    assert store.find_current(obj("dirlink/f", b"secret")) is None
    # Publishing through a planted folder symlink replaces the symlink, never writes outside.
    download(store, obj("dirlink/f", b"new!!!"), b"new!!!")
    assert (outside / "sub" / "f").read_bytes() == b"secret"
    assert not (root / "dirlink").is_symlink() and (root / "dirlink" / "f").read_bytes() == b"new!!!"


def test_partial_resume_only_for_the_same_version(store: Store) -> None:
    data = b"0123456789"
    o = obj("r/f", data)
    p = store.partials.open(o, 4)
    os.pwrite(p.fd, data[:4], 0)
    p.done.add(0)
    p.save_state(p.done)
    os.close(p.fd)
    again = store.partials.open(o, 4)
    assert again.done == {0} and os.pread(again.fd, 4, 0) == data[:4]
    os.close(again.fd)
    other_chunking = store.partials.open(o, 2)
    assert other_chunking.done == set()
    os.close(other_chunking.fd)
    store.partials.discard(other_chunking)


def test_a_download_another_process_runs_is_downloading_not_partial(store: Store, tmp_path: Path) -> None:
    """A mount downloads a file (it holds the version's lock) and has saved
    a resume record; `status --store` opens the store on its own.  Before,
    it said `partial` (and "0 downloading"); now `downloading`, with the
    bytes recorded.  The look takes nothing from the downloader: its lock
    is still held, and no other process could take it meanwhile.  Once the
    download stops, it is `partial` again; and a version nobody ever
    downloaded gets no lock file from the look."""
    data = b"0123456789"
    o = obj("r/f", data)
    p = store.partials.open(o, 4)
    os.pwrite(p.fd, data[:4], 0)
    p.save_state({0})
    held = store.partials.lock(o)
    assert held is not None
    looker = Store.open(str(tmp_path / "store"))  # as `lazyfs status --store` opens it
    try:
        state = looker.local_state(o)
        assert (state.state, state.bytes) == (FileState.DOWNLOADING, 4)
        assert looker.partials.lock(o) is None, "the look took the downloader's lock from it"
        store.partials.unlock(o, held)
        assert looker.local_state(o).state is FileState.PARTIAL
        never = obj("r/g", data)
        assert looker.local_state(never).state is FileState.MISSING
        assert not any(n.endswith(".lock") for n in os.listdir(tmp_path / "store/.lazyfs/tmp")), \
            "the look made a lock file"
    finally:
        looker.close()
        os.close(p.fd)
        store.partials.discard(p)


def test_a_late_record_never_describes_a_newer_download(store: Store, tmp_path: Path) -> None:
    data = b"0123456789"
    o = obj("r/f", data)
    old = store.partials.open(o, 4)
    old.done.add(0)
    store.partials.discard(old)  # the download failed and was cleaned up...
    fresh = store.partials.open(o, 4)
    old.save_state(old.done)  # ...but a save of the old one lands after that
    os.close(fresh.fd)
    again = store.partials.open(o, 4)
    assert again.done == set(), "resumed from a record written for another file"
    store.partials.discard(old)  # the old download's cleanup must not remove the newer files
    part = tmp_path / "store" / ".lazyfs" / "tmp" / (again.name + ".part")
    assert part.exists() and part.stat().st_ino == again.ino
    os.close(again.fd)
    os.close(old.fd)


def test_publish_refuses_wrong_size(store: Store) -> None:
    o = obj("w/f", b"abc")
    p = store.partials.open(o, 4)
    os.ftruncate(p.fd, 1)
    with pytest.raises(StoreError, match="wrong size"):
        store.publish(p)
    os.close(p.fd)


def test_layout_version_mismatch_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s" / ".lazyfs").mkdir(parents=True)
    (tmp_path / "s" / ".lazyfs" / "layout").write_text("99\n")
    with pytest.raises(StoreError, match="layout version"):
        Store.open(str(tmp_path / "s"))


def test_verify_md5_crc32_sha256_and_multipart(tmp_path: Path) -> None:
    import base64
    import zlib

    data = os.urandom(300_000)
    f = tmp_path / "f"
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        md5 = hashlib.md5(data).hexdigest()
        verify.check(fd, len(data), verify.Expectation("MD5", md5), "u")
        crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
        verify.check(fd, len(data), verify.Expectation("CRC32", crc), "u")
        sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
        verify.check(fd, len(data), verify.Expectation("SHA256", sha), "u")
        part = 100_000
        mp = hashlib.md5(b"".join(hashlib.md5(data[i:i + part]).digest()
                                  for i in range(0, len(data), part))).hexdigest() + "-3"
        verify.check(fd, len(data), verify.Expectation("MD5-multipart", mp, (part, part, part)), "u")
        with pytest.raises(IntegrityError, match="do not match"):
            verify.check(fd, len(data), verify.Expectation("MD5", "0" * 32), "u")
    finally:
        os.close(fd)
    def no_parts(n: int) -> None:
        return None

    assert verify.choose("not-an-etag", None, True, 10, no_parts) is None
    md5etag = "d41d8cd98f00b204e9800998ecf8427e"
    assert verify.choose(md5etag, None, True, 0, no_parts).algorithm == "MD5"  # type: ignore[union-attr]
    assert verify.choose(md5etag, None, False, 0, no_parts) is None, "SSE-KMS ETags are not MD5s"
    assert verify.choose(md5etag, ("CRC32", "x", "FULL_OBJECT"), True, 0, no_parts).algorithm == "CRC32"  # type: ignore[union-attr]
    assert verify.choose(md5etag, ("SHA256", "x-3", "COMPOSITE"), True, 0, no_parts).algorithm == "MD5"  # type: ignore[union-attr]


def test_multipart_part_sizes_are_trusted_only_when_the_store_confirms_the_parts() -> None:
    mib = 1 << 20
    mpe = "0123456789abcdef0123456789abcdef-4"
    size = 3 * 8 * mib + 5
    confirmed = verify.choose(mpe, None, True, size, lambda n: verify.Part(8 * mib, 4))
    assert confirmed == verify.Expectation("MD5-multipart", mpe, (8 * mib,) * 3 + (5,), exact=False)
    # Ceph RGW and s3rver ignore partNumber: the whole length and no parts count.
    assert verify.choose(mpe, None, True, size, lambda n: verify.Part(size, 0)) is None
    # Another parts count than the ETag's, or sizes that cannot add up.
    assert verify.choose(mpe, None, True, size, lambda n: verify.Part(8 * mib, 5)) is None
    assert verify.choose(mpe, None, True, size, lambda n: verify.Part(1 * mib, 4)) is None
    two = "0123456789abcdef0123456789abcdef-2"
    assert verify.choose(two, None, True, 10, lambda n: verify.Part(7, 2)).exact  # type: ignore[union-attr]
    sizes = {1: 5, 2: 3, 3: 2}
    assert verify.exact_part_sizes(10, 3, lambda n: verify.Part(sizes[n], 3)) == (5, 3, 2)
    assert verify.exact_part_sizes(11, 3, lambda n: verify.Part(sizes[n], 3)) is None


def test_sweep_frees_index_entries_whose_published_paths_were_deleted(store: Store, tmp_path: Path) -> None:
    kept, deleted = obj("m/kept.bin", b"k" * 5000), obj("m/gone.bin", b"g" * 5000)
    download(store, kept, b"k" * 5000)
    download(store, deleted, b"g" * 5000)
    (tmp_path / "store" / "m/gone.bin").unlink()  # an admin's rm: the index entry alone keeps the bytes
    assert store.sweep(keep=[kept, deleted]) >= 5000
    entries = {p.name for p in (tmp_path / "store" / ".lazyfs" / "objects").iterdir()}
    assert entries == {store.index.entry_name(kept.etag, kept.size)}
    copy = store.find_current(kept)
    assert copy is not None
    os.close(copy.fd)


def test_verified_names_the_check_a_prebaked_copy_passed(tmp_path: Path) -> None:
    """--verify etag: a copy in the store is stamped with how its content was
    checked; one in a read-only layer cannot be, and the check remembers it
    (user.lazyfs.verified).  Unchecked, an unrecorded copy was judged by size."""
    from lazyfs.probe import PrebakedCheck
    from support.fakeremote import FakeRemote

    remote = FakeRemote()
    in_store = remote.put("bkt", "m/s.bin", b"store copy")
    in_layer = remote.put("bkt", "m/l.bin", b"layer copy", checksum="CRC32")
    (tmp_path / "s" / "m").mkdir(parents=True)
    (tmp_path / "s" / "m" / "s.bin").write_bytes(b"store copy")
    (tmp_path / "layer" / "m").mkdir(parents=True)
    (tmp_path / "layer" / "m" / "l.bin").write_bytes(b"layer copy")
    s = Store.open(str(tmp_path / "s"), [str(tmp_path / "layer")])
    try:
        check = PrebakedCheck(remote, s)
        assert s.local_state(in_layer, check.checked).verified == "size"
        for o in (in_store, in_layer):
            copy = s.find_current(o)
            assert copy is not None and check(o, copy)
            os.close(copy.fd)
        assert s.local_state(in_store).verified == "MD5"  # recorded in the store
        assert s.local_state(in_layer, check.checked).verified == "CRC32"
        assert s.local_state(in_layer).verified == "size", "without the mount's memory: its size"
    finally:
        s.close()


def test_a_file_overwritten_in_place_is_not_its_records_version(store: Store, tmp_path: Path) -> None:
    """`cp` over a published file keeps its inode and identity xattr; its mtime moves: the record is not
    the file's any more, and the file is judged as an unrecorded copy (by size, or by content)."""
    o = obj("m/w.bin", b"weights-1")
    download(store, o, b"weights-1")
    path = tmp_path / "store" / "m/w.bin"
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.write(b"admin-cp!")
    assert IDENTITY_XATTR in os.listxattr(path)
    copy = store.find_current(o)
    assert copy is not None and copy.state == "prebaked"
    os.close(copy.fd)
    assert store.local_state(o).verified == "size"
    os.truncate(path, 5)
    os.utime(path, ns=(o.mtime_ns, o.mtime_ns))  # the recorded mtime, another size
    assert store.local_state(obj("m/w.bin", b"12345", o.etag)).state == "prebaked"


def test_a_record_still_describes_its_file_after_an_image_layer_cut_its_mtime_to_the_second(
        store: Store, tmp_path: Path) -> None:
    o = dataclasses.replace(obj("m/w.bin", b"weights"), mtime_ns=1_700_000_000_123_456_789)
    download(store, o, b"weights")
    path = tmp_path / "store" / "m/w.bin"
    os.utime(path, ns=(1_700_000_000 * 10**9,) * 2)  # tar, as Docker writes layers
    assert store.local_state(o).state == "cached"
    os.utime(path, ns=(1_700_000_001 * 10**9,) * 2)
    assert store.local_state(o).state == "prebaked"


class _NoChecksums:
    """A remote whose objects have nothing to check a copy against (SSE-KMS ETags, no checksum)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def head(self, bucket: str, key: str, etag: str | None = None) -> Any:
        return dataclasses.replace(self.inner.head(bucket, key, etag), checksum=None, etag_is_md5=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("pinned", [False, True])
def test_a_pinned_check_never_serves_a_copy_only_its_size_vouches_for(tmp_path: Path, pinned: bool) -> None:
    """Unpinned (--verify etag), an unrecorded copy that cannot be checked is used, as its size matches;
    pinned, only bytes shown to be the locked version are served: it is rejected, and shows as stale.
    A copy whose bytes differ is rejected either way."""
    from lazyfs.probe import PrebakedCheck
    from support.fakeremote import FakeRemote

    remote = FakeRemote()
    right = remote.put("bkt", "m/right.bin", b"the locked bytes")
    wrong = remote.put("bkt", "m/wrong.bin", b"the locked bytes")
    (tmp_path / "layer" / "m").mkdir(parents=True)
    (tmp_path / "layer" / "m" / "right.bin").write_bytes(b"the locked bytes")
    (tmp_path / "layer" / "m" / "wrong.bin").write_bytes(b"zeros, same size")
    (tmp_path / "s").mkdir()
    s = Store.open(str(tmp_path / "s"), [str(tmp_path / "layer")])
    try:
        unverifiable = PrebakedCheck(_NoChecksums(remote), s, pinned)
        by_content = PrebakedCheck(remote, s, pinned)
        for check, o, served, state in ((unverifiable, right, not pinned, "stale" if pinned else "prebaked"),
                                        (by_content, right, True, "prebaked"), (by_content, wrong, False, "stale")):
            copy = s.find_current(o)
            assert copy is not None and check(o, copy) is served, (o.key, check)
            os.close(copy.fd)
            assert s.local_state(o, check.checked).state == state, (o.key, check)
    finally:
        s.close()
def test_a_record_too_big_for_the_files_xattrs_is_kept_in_a_sidecar(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4 keeps a file's extended attributes in one 4 KiB block: the record of
    a key some thousands of bytes long has no room there, and setxattr says
    ENOSPC with the disk far from full.  Publishing failed with "No space left
    on device"; the record is a sidecar now, and the file is kept and served."""
    real = os.setxattr

    def ext4_like(fd: int, name: str, value: bytes, *args: object) -> None:
        if len(value) > 4000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, name, value, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "setxattr", ext4_like)
    (tmp_path / "store").mkdir()
    store = Store.open(str(tmp_path / "store"))
    deep = obj("m/" + "/".join(["d" * 200] * 25) + "/deep.bin", b"deep")
    small = obj("m/small.bin", b"small")
    try:
        assert download(store, deep, b"deep")
        assert download(store, small, b"small")
        assert current_state(store, deep) is FileState.CACHED
        assert store.identities.supported, "the store still keeps the other files' records in xattrs"
        assert os.getxattr(tmp_path / "store" / "m/small.bin", IDENTITY_XATTR)
        assert len(list((tmp_path / "store" / ".lazyfs" / "identities").iterdir())) == 1
    finally:
        store.close()
    store = Store.open(str(tmp_path / "store"))  # a restart finds the sidecar
    try:
        assert current_state(store, deep) is FileState.CACHED
    finally:
        store.close()


def test_the_sweep_keeps_index_entries_of_a_store_copied_without_its_hard_links(tmp_path: Path) -> None:
    """A store copied file by file (shutil.copytree, as an image build might:
    the xattrs come along, the hard links do not): every index entry has a
    link count of 1, yet the path its record names holds the same bytes, and
    the entry is what links a new version's unchanged files.  An entry whose
    path was deleted goes; one with no record (nothing tells) stays."""
    (tmp_path / "image").mkdir()
    image = Store.open(str(tmp_path / "image"))
    v3 = obj("m/v3/tok.json", b"t" * 5000)
    gone = obj("m/v3/old.bin", b"o" * 5000)
    try:
        download(image, v3, b"t" * 5000)
        download(image, gone, b"o" * 5000)
    finally:
        image.close()
    shutil.copytree(tmp_path / "image", tmp_path / "pod", symlinks=True)
    (tmp_path / "pod" / "m/v3/old.bin").unlink()
    objects = tmp_path / "pod" / ".lazyfs" / "objects"
    (objects / "0123456789abcdef").write_bytes(b"no record")
    pod = Store.open(str(tmp_path / "pod"))
    try:
        assert pod.sweep(keep=[v3]) >= 5000
        assert {p.name for p in objects.iterdir()} == {pod.index.entry_name(v3.etag, v3.size), "0123456789abcdef"}
        v4 = obj("m/v4/tok.json", b"t" * 5000)
        copy = pod.materialise(v4)  # linked from the index, not fetched
        assert copy is not None
        os.close(copy.fd)
    finally:
        pod.close()
