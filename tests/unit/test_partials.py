"""Unit tests: downloads in progress on disk (partials.py): resume records of
any size, in both formats; the sweep of what unwanted versions left behind."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from lazyfs import partials, storeroom, storesweep, storewrite
from lazyfs.errors import StoreError
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store
from support.filesystems import can_allocate

MiB = 1 << 20


def obj(key: str, size: int, tag: str = "") -> RemoteObject:
    return RemoteObject("bkt", key, size, hashlib.md5(f"{key}{size}{tag}".encode()).hexdigest(), 1_700_000_000 * 10**9)


def tmp_names(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "store" / ".lazyfs" / "tmp").iterdir()} - {"publish.lock"}


def test_a_download_above_2_tib_resumes_from_its_record(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # 2.1 million 1 MiB blocks: as a list of numbers the record passed the
    # 16 MiB read limit and the whole download started again.
    monkeypatch.setattr(storeroom, "check", lambda tmp_fd, o, store_path, need=None: None)
    o = obj("huge/w.bin", (2 << 40) + (100 << 30))  # a sparse file: no space used
    p = store.partials.open(o, MiB)
    n = p.nblocks
    assert n > 2_100_000
    p.save_state(range(n - 1))  # all but the last block
    p.close()
    again = store.partials.open(o, MiB)
    try:
        assert len(again.done) == n - 1 and n - 1 not in again.done
        assert store.partials.resumable_bytes(o) == (n - 1) * MiB
    finally:
        again.close()
        store.partials.discard(again)


def test_records_of_the_first_format_still_resume(store: Store, tmp_path: Path) -> None:
    o = obj("r/f", 10)
    p = store.partials.open(o, 4)
    p.close()
    record = {"v": 1, "bucket": o.bucket, "key": o.key, "etag": o.etag, "size": o.size, "block_size": 4,
              "ino": p.ino, "done": [0, 2]}
    (tmp_path / "store" / ".lazyfs" / "tmp" / f"{p.name}.json").write_text(json.dumps(record))
    again = store.partials.open(o, 4)
    assert again.done == {0, 2}
    assert store.partials.resumable_bytes(o) == 4 + 2  # the last block is short
    again.close()


def test_a_scattered_download_records_fewer_blocks_never_more() -> None:
    from lazyfs import resume

    assert resume.runs_of([5, 0, 1, 2, 7, 8, 9, 10]) == [[0, 3], [5, 6], [7, 11]]
    assert resume.runs_of([5, 0, 1, 2, 7, 8, 9, 10], limit=2) == [[0, 3], [7, 11]]
    assert resume.runs_of(range(0, 2_000_000, 2)) == [[b, b + 1] for b in range(0, 2 * resume.MAX_RUNS, 2)]


def test_a_sealed_partial_without_write_permission_starts_afresh(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish cut short after the file was made read-only: without
    CAP_DAC_OVERRIDE it cannot be opened for writing, which must not fail the
    download for good."""
    o = obj("s/f", 8)
    p = store.partials.open(o, 4)
    p.save_state({0, 1})
    os.fchmod(p.fd, 0o444)
    p.close()
    real_open = os.open

    def as_without_dac_override(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if str(path).endswith(".part") and flags & os.O_RDWR and not flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied")  # the 0444 file
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", as_without_dac_override)
    again = store.partials.open(o, 4)
    assert again.done == set()
    again.close()


def test_a_store_that_states_no_size_is_not_full(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    def ramfs_like(fd: Any) -> Any:
        st = real(fd)
        return os.statvfs_result((st.f_bsize, st.f_frsize, 0, 0, 0, 0, 0, 0, st.f_flag, st.f_namemax))

    monkeypatch.setattr(os, "statvfs", ramfs_like)
    p = store.partials.open(obj("z/f", 5 * MiB), MiB)
    p.close()


# -- the sweep ----------------------------------------------------------------------------------

def test_sweep_removes_only_old_unlocked_leftovers_of_unwanted_versions(store: Store, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    wanted, unwanted, running = obj("m/a", 8), obj("m/a", 8, "old"), obj("m/b", 8, "old")
    for o in (wanted, unwanted, running):
        p = store.partials.open(o, 4)
        os.pwrite(p.fd, b"x" * 8, 0)
        p.save_state({0, 1})
        p.close()
    held = store.partials.lock(running)  # another process still downloads it
    assert held is not None
    stray = tmp_path / "store" / ".lazyfs" / "tmp" / "abc.json.123.456.tmp"
    stray.write_bytes(b"{")
    before = tmp_names(tmp_path)
    assert store.partials.sweep(keep=[wanted]) == 0, "nothing is old enough yet"
    assert tmp_names(tmp_path) == before
    later = time.time() + 2 * partials.SWEEP_AGE_S
    monkeypatch.setattr(partials.time, "time", lambda: later)
    assert store.partials.sweep(keep=[wanted]) > 0
    gone = {f"{store.partials.name(unwanted)}.{ext}" for ext in ("part", "json")} | {stray.name}
    assert tmp_names(tmp_path) == before - gone
    resumed = store.partials.open(wanted, 4)
    assert resumed.done == {0, 1}
    resumed.close()
    store.partials.unlock(running, held)


def test_sweep_removes_the_record_a_publish_left_of_a_current_version(store: Store, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed between publishing a download (the sparse file renamed
    into place) and removing its resume record left the record, and the lock
    file, of a version the listing still names.  Nothing is left to resume:
    the sweep removes them once old (before, they stayed as long as the object
    was listed).  A current version's download with its sparse file stays."""
    published, resumable = obj("m/a", 8), obj("m/b", 8)
    for o in (published, resumable):
        p = store.partials.open(o, 4)
        os.pwrite(p.fd, b"x" * 8, 0)
        p.save_state({0, 1})
        p.close()
    name = store.partials.name(published)
    tmp = tmp_path / "store" / ".lazyfs" / "tmp"
    os.rename(tmp / f"{name}.part", tmp_path / "store" / "published-elsewhere")  # the publish's rename
    (tmp / f"{name}.lock").write_bytes(b"")  # its lock, no longer held by the killed process
    later = time.time() + 2 * partials.SWEEP_AGE_S
    monkeypatch.setattr(partials.time, "time", lambda: later)
    assert store.partials.sweep(keep=[published, resumable]) > 0
    assert not {n for n in tmp_names(tmp_path) if n.startswith(name)}
    resumed = store.partials.open(resumable, 4)
    assert resumed.done == {0, 1}
    resumed.close()


def test_a_mounts_sweep_removes_the_download_of_a_listed_file_larger_than_its_budget(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `kill -9` in the middle of reading a file larger than --cache-max-size
    left its sparse file (96 MiB beside a 50 MiB budget, a tester found).  The
    file is still listed, so the sweep kept it for a resume the budget never
    keeps: it stayed until the file was opened again.  The mount's sweep keeps
    only what the budget says fits."""
    small, big = obj("m/config.json", 8), obj("m/big.bin", 64)
    for o in (small, big):
        p = store.partials.open(o, 4)
        os.pwrite(p.fd, b"x" * 8, 0)
        p.save_state({0, 1})
        p.close()
    later = time.time() + 2 * partials.SWEEP_AGE_S
    monkeypatch.setattr(partials.time, "time", lambda: later)
    trio.run(storesweep.sweep, store, [small, big], trio.CapacityLimiter(1), lambda o: o.size <= 32)
    assert not {n for n in tmp_names(tmp_path) if n.startswith(store.partials.name(big))}
    resumed = store.partials.open(small, 4)
    assert resumed.done == {0, 1}
    resumed.close()


def test_a_save_of_the_record_that_ends_after_the_publish_leaves_no_record(store: Store, tmp_path: Path) -> None:
    """A save of the resume record already under way in a worker thread when
    the download was published (its sparse file renamed into place, its record
    removed) wrote the record back after the removal: a stray `.json` of a
    published file, for as long as the object was listed."""
    o = obj("m/small.json", 8)
    p = store.partials.open(o, 4)
    os.pwrite(p.fd, b"x" * 8, 0)
    p.save_state({0})
    os.rename(tmp_path / "store" / ".lazyfs" / "tmp" / f"{p.name}.part", tmp_path / "store" / "small.json")
    store.partials.forget_record(p)  # the publish
    p.save_state({0, 1})  # the save that was under way
    p.close()
    assert not {n for n in tmp_names(tmp_path) if n.startswith(p.name)}


def test_wants_of_followers_are_read_whole_lines_at_a_time_and_go_with_the_download(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A follower's wants (coop.py) reach the owner as byte ranges, each once;
    a line being written is left for the next read; junk is skipped; a want
    file that started over is read from its start; publishing or discarding
    the download removes it, and the sweep removes one a follower left later."""
    o = obj("m/w.bin", 8 * MiB)
    files = store.partials
    assert files.wants(o, 0) == (0, [])  # nobody asked
    files.want(o, 0, 4096)
    files.want(o, 5 * MiB, 6 * MiB)
    offset, ranges = files.wants(o, 0)
    assert ranges == [(0, 4096), (5 * MiB, 6 * MiB)]
    assert files.wants(o, offset) == (offset, [])  # nothing new

    path = tmp_path / "store" / ".lazyfs" / "tmp" / (files.name(o) + ".want")
    with open(path, "ab") as f:
        f.write(b"junk line\n7 8\n99 ")  # a bad line, a good one, one half written
    offset, ranges = files.wants(o, offset)
    assert ranges == [(7, 8)]
    with open(path, "ab") as f:
        f.write(b"100\n")
    offset, ranges = files.wants(o, offset)
    assert ranges == [(99, 100)]

    path.write_bytes(b"1 2\n")  # a new owner's file, shorter than where we were
    offset, ranges = files.wants(o, offset)
    assert ranges == [(1, 2)]
    with open(path, "ab") as f:  # a run of junk with no line end is skipped, not read forever
        f.write(b"x" * (partials._WANTS_READ_MAX + 10) + b"\n3 4\n")
    offset, ranges = files.wants(o, offset)
    assert ranges == []
    assert files.wants(o, offset)[1] == [(3, 4)]
    path.unlink()
    os.mkfifo(path, 0o600)  # planted: asking fails at once, reading hears nothing
    with pytest.raises(OSError):
        files.want(o, 0, 1)
    with pytest.raises(OSError):
        files.wants(o, 0)
    path.unlink()

    p = files.open(o, MiB)
    files.forget_record(p)  # published
    assert not path.exists()
    files.want(o, 0, 1)  # a follower that had not seen the publish yet
    files.discard(p)
    assert not path.exists()
    p.close()

    files.want(o, 0, 1)  # and one after that: the sweep takes it once untouched for long,
    files.sweep(keep=[o])  # even of a version still listed
    assert path.exists()
    later = time.time() + 2 * partials.SWEEP_AGE_S
    monkeypatch.setattr(partials.time, "time", lambda: later)
    files.sweep(keep=[o])
    assert not path.exists()


def test_every_download_file_gets_its_blocks_at_the_start(store: Store) -> None:
    """Its blocks allocated, a download's room is taken before a byte is
    fetched (storeroom.py), and its direct writes need not take turns
    (storewrite.py).  A small one too: sparse, its room was counted free by
    every download admitted beside it, and all ran out part-way together."""
    big, small = store.partials.open(obj("m/big.bin", 16 * MiB), MiB), store.partials.open(obj("m/s.bin", MiB), MiB)
    try:
        if not can_allocate(Path(store.partials.store_path)):
            pytest.skip("the test folder's filesystem cannot allocate blocks up front")
        assert big.preallocated and os.fstat(big.fd).st_blocks * 512 >= 16 * MiB
        assert os.pread(big.fd, MiB, 8 * MiB) == bytes(MiB)
        assert small.preallocated and os.fstat(small.fd).st_blocks * 512 >= MiB
    finally:
        big.close()
        small.close()


def test_a_download_whose_room_others_took_since_the_check_is_refused_before_a_byte(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The free space was there when checked, but the downloads admitted
    beside it took it (fallocate: ENOSPC): refused with the check's line,
    no file left behind, not failed part-way later."""

    def full(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(storewrite, "_fallocate", lambda: full)
    with pytest.raises(StoreError) as info:
        store.partials.open(obj("m/four.bin", 4 * MiB), MiB)
    assert info.value.errno == errno.ENOSPC
    assert "needs 4.0 MiB" in str(info.value) and "free" in str(info.value)
    assert tmp_names(tmp_path) == set()


def test_a_download_whose_space_the_store_cannot_state_stays_sparse(store: Store,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that states no size (ramfs, some network ones), or one
    that fills itself before it says it cannot: no allocation up front."""
    real = os.statvfs

    def no_size(fd: int) -> os.statvfs_result:
        st = real(fd)
        return os.statvfs_result((st[0], st[1], 0, *st[3:]))  # f_blocks 0

    monkeypatch.setattr(partials.os, "statvfs", no_size)
    part = store.partials.open(obj("m/big.bin", 16 * MiB), MiB)
    try:
        assert not part.preallocated and os.fstat(part.fd).st_blocks == 0
    finally:
        part.close()


def test_a_download_refused_for_want_of_space_says_by_how_much(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 6 MiB file on a store with 4 KiB less free: "needs 6.0 MiB but the
    store has 6.0 MiB free" hid why it was refused."""
    o = obj("m/six.bin", 6 * MiB)
    real = os.statvfs

    def almost_room(fd: int) -> Any:
        st = real(fd)
        return os.statvfs_result((4096, 4096, st.f_blocks, st.f_bfree, (6 * MiB - 4096) // 4096, *st[5:]))

    monkeypatch.setattr(os, "statvfs", almost_room)
    with pytest.raises(StoreError) as refused:
        store.partials.open(o, MiB)
    assert refused.value.errno == errno.ENOSPC
    assert "needs 6.0 MiB (6,291,456 bytes) but the store" in str(refused.value)
    assert "has 6.0 MiB (6,287,360 bytes) free" in str(refused.value)


def test_a_lock_refused_near_the_descriptor_limit_names_the_file_not_the_lock(store: Store,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE opening tmp/<id>.lock reached the open's log line as a bare
    OSError naming only the internal lock file; it is a store error naming
    the object, with the errno the reader gets, and whose limit ran out
    (the bare "Too many open files" left an operator guessing)."""
    real_open = os.open

    def out_of_descriptors(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".lock") and str(path) != "publish.lock":
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(partials.os, "open", out_of_descriptors)
    o = obj("m/many/f1.txt", 10)
    with pytest.raises(StoreError) as info:
        store.partials.lock(o)
    assert info.value.errno == errno.EMFILE
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert str(info.value).startswith('"s3://bkt/m/many/f1.txt": cannot lock the download in the store: too many open '
                                      f"files: the daemon's descriptor limit (ulimit -n / RLIMIT_NOFILE) is {soft}")


def left_sparse(store: Store, o: RemoteObject) -> str:
    """What an earlier run left of a download of `o` (1 MiB blocks): its first
    block on disk and recorded, the rest a hole (a run on a filesystem, or of
    a lazyfs, that did not allocate up front).  Its name in tmp/."""
    if not can_allocate(Path(store.partials.store_path)):
        pytest.skip("the test folder's filesystem cannot allocate blocks up front")
    p = store.partials.open(o, MiB)
    os.pwrite(p.fd, b"x" * MiB, 0)
    p.save_state({0})
    fallocate = storewrite._fallocate()
    assert fallocate is not None and fallocate(p.fd, 0x03, MiB, o.size - MiB) == 0  # PUNCH_HOLE | KEEP_SIZE
    assert os.fstat(p.fd).st_blocks * 512 < o.size
    p.close()
    return p.name


def test_a_resumed_download_gets_the_blocks_it_has_not_got_at_the_start(store: Store) -> None:
    """A fresh download's file gets all its blocks up front, so what does not
    fit is refused before a byte; a resumed one stayed sparse and ran out
    part-way.  Its missing blocks are taken now, its bytes kept."""
    o = obj("m/resumed.bin", 4 * MiB)
    left_sparse(store, o)
    again = store.partials.open(o, MiB)
    try:
        assert again.done == {0}
        assert again.preallocated and os.fstat(again.fd).st_blocks * 512 >= o.size
        assert os.pread(again.fd, MiB, 0) == b"x" * MiB and os.pread(again.fd, MiB, 2 * MiB) == bytes(MiB)
    finally:
        again.close()


def test_a_resumed_download_that_cannot_fit_is_refused_before_a_byte_its_bytes_kept(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """3 MiB still to come, 2 MiB free: the same line as a fresh download's
    refusal, for what it still needs; its file and record stay for a later try."""
    o = obj("m/resumed.bin", 4 * MiB)
    name = left_sparse(store, o)
    real = os.statvfs

    def two_mib_free(fd: int) -> Any:
        st = real(fd)
        return os.statvfs_result((4096, 4096, st.f_blocks, st.f_bfree, 2 * MiB // 4096, *st[5:]))

    monkeypatch.setattr(os, "statvfs", two_mib_free)
    with pytest.raises(StoreError) as refused:
        store.partials.open(o, MiB)
    assert refused.value.errno == errno.ENOSPC
    assert str(refused.value).startswith('"s3://bkt/m/resumed.bin": needs 3.0 MiB but the store ')
    assert str(refused.value).endswith(" has 2.0 MiB free")
    assert tmp_names(tmp_path) == {f"{name}.part", f"{name}.json"}
    assert store.partials.resumable_bytes(o) == MiB
    assert (tmp_path / "store" / ".lazyfs" / "tmp" / f"{name}.part").read_bytes()[:MiB] == b"x" * MiB


def test_a_resumed_download_whose_room_others_took_is_refused_its_bytes_kept(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check passed but fallocate found no room (downloads admitted
    beside it): refused, and the blocks it took given back without the
    fresh file's truncation, which would have lost the bytes already there."""
    o = obj("m/resumed.bin", 4 * MiB)
    name = left_sparse(store, o)
    real = storewrite._fallocate()
    assert real is not None

    def full(fd: int, mode: int, offset: int, length: int) -> int:
        if mode == 0:
            real(fd, 0, MiB, MiB)  # takes some of the room (the second block) before it runs out
            ctypes.set_errno(errno.ENOSPC)
            return -1
        return real(fd, mode, offset, length)

    monkeypatch.setattr(storewrite, "_fallocate", lambda: full)
    monkeypatch.setattr(storeroom, "_APART_S", 0.0)
    with pytest.raises(StoreError) as refused:
        store.partials.open(o, MiB)
    assert refused.value.errno == errno.ENOSPC and "needs 3.0 MiB" in str(refused.value)
    part = tmp_path / "store" / ".lazyfs" / "tmp" / f"{name}.part"
    assert part.stat().st_size == o.size and part.read_bytes()[:MiB] == b"x" * MiB
    assert part.stat().st_blocks * 512 < 2 * MiB  # what it took is given back: only the first block held
    assert store.partials.resumable_bytes(o) == MiB


def test_a_resumed_download_holding_all_its_blocks_needs_no_more_room(store: Store,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    o = obj("m/whole.bin", 4 * MiB)
    if not can_allocate(Path(store.partials.store_path)):
        pytest.skip("the test folder's filesystem cannot allocate blocks up front")
    p = store.partials.open(o, MiB)
    p.save_state({0})
    p.close()
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda fd: os.statvfs_result((*real(fd)[:4], 0, *real(fd)[5:])))  # 0 free
    again = store.partials.open(o, MiB)
    try:
        assert again.done == {0}
    finally:
        again.close()
