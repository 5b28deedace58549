"""Unit tests: how a request's pieces reach the sparse file (storewrite.py):
direct where offset and length are aligned, buffered otherwise, the same
bytes either way."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from pathlib import Path

import pytest

from lazyfs import storewrite
from lazyfs.errors import StoreError
from lazyfs.namespace import RemoteObject
from lazyfs.stats import STATS
from lazyfs.storewrite import ALIGN, PieceWriter, WriterClosed, WriteTurns
from support.filesystems import can_allocate

OBJ = RemoteObject("bkt", "m/w.bin", 1, "e" * 32, 1)
MiB = 1024 * 1024


def _file(tmp_path: Path, size: int) -> int:
    fd = os.open(tmp_path / "f.part", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    return fd


def _direct_works(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def _cached(fd: int, offset: int, size: int) -> bool:
    """Whether [offset, offset + size) reads without going to the disk."""
    try:
        os.preadv(fd, [bytearray(size)], offset, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False


def _pieces(data: bytes, first: int, piece: int) -> list[tuple[int, bytes]]:
    """data cut as ranged_get cuts a body: a first piece, then equal ones."""
    out, pos, n = [], 0, first
    while pos < len(data):
        out.append((pos, data[pos:pos + n]))
        pos, n = pos + n, piece
    return out


def test_aligned_pieces_go_past_the_page_cache_and_the_tail_through_it(tmp_path: Path) -> None:
    size = 3 * MiB + 1234  # a file's tail is never aligned
    data = os.urandom(size)
    fd = _file(tmp_path, size)
    if not _direct_works(tmp_path / "f.part"):
        pytest.skip("the test folder's filesystem refuses O_DIRECT")
    before = STATS.direct_bytes
    try:
        pieces = _pieces(data, 64 * 1024, 256 * 1024)
        with PieceWriter(fd, OBJ, direct=lambda: True, turns=WriteTurns()) as writer:
            for offset, piece in pieces:
                writer.write(piece, offset)
        assert STATS.direct_bytes - before == size - len(pieces[-1][1])
        assert not _cached(fd, 0, MiB)  # the direct bytes left no page behind
        assert os.pread(fd, size, 0) == data
    finally:
        os.close(fd)


def test_buffered_writes_stay_in_the_page_cache(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    fd = _file(tmp_path, len(data))
    before = STATS.direct_bytes
    try:
        with PieceWriter(fd, OBJ, direct=lambda: False, turns=WriteTurns()) as writer:
            for offset, piece in _pieces(data, 64 * 1024, 256 * 1024):
                writer.write(piece, offset)
        assert STATS.direct_bytes == before
        assert _cached(fd, 0, MiB)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)


def test_unaligned_offsets_and_lengths_are_written_buffered(tmp_path: Path) -> None:
    """A body resumed mid-piece, or a store's odd chunk: same bytes, no direct write."""
    data = os.urandom(MiB)
    fd = _file(tmp_path, len(data))
    before = STATS.direct_bytes
    try:
        with PieceWriter(fd, OBJ, direct=lambda: True, turns=WriteTurns()) as writer:
            writer.write(data[:ALIGN + 7], 0)  # unaligned length
            writer.write(data[ALIGN + 7:3 * ALIGN], ALIGN + 7)  # unaligned offset
            writer.write(data[3 * ALIGN:], 3 * ALIGN)  # aligned both: direct where the fs allows
        assert STATS.direct_bytes - before in (0, len(data) - 3 * ALIGN)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)


def test_a_filesystem_refusing_o_direct_gets_buffered_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """...and the operator is told once, at INFO, why nothing goes direct."""
    real_open = os.open
    monkeypatch.setattr(storewrite, "_refusal_told", threading.Event())

    def no_direct(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(storewrite.os, "open", no_direct)
    data = os.urandom(MiB)
    fd = _file(tmp_path, len(data))
    before = STATS.direct_bytes
    try:
        with caplog.at_level(logging.INFO, logger="lazyfs.storewrite"):
            for _ in range(2):
                with PieceWriter(fd, OBJ, direct=lambda: True, turns=WriteTurns()) as writer:
                    writer.write(data, 0)
        assert STATS.direct_bytes == before and os.pread(fd, len(data), 0) == data
        told = [r for r in caplog.records if r.levelno == logging.INFO]
        assert len(told) == 1 and "direct writes are refused (/proc/self/fd: Invalid argument)" in told[0].message
    finally:
        os.close(fd)


def test_a_direct_write_refused_midway_finishes_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some filesystems accept the O_DIRECT open and refuse the write (EINVAL
    for an alignment they want larger): that piece and the rest go buffered."""
    data = os.urandom(MiB)
    fd = _file(tmp_path, len(data))
    real_pwrite = os.pwrite
    refused: list[int] = []

    def pwrite(wfd: int, buf: object, offset: int) -> int:
        if wfd != fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(wfd, buf, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(storewrite.os, "pwrite", pwrite)
    monkeypatch.setattr(storewrite, "_reopen_direct", lambda _fd: os.dup(fd))
    try:
        with PieceWriter(fd, OBJ, direct=lambda: True, turns=WriteTurns()) as writer:
            writer.write(data[:MiB // 2], 0)
            writer.write(data[MiB // 2:], MiB // 2)
        assert refused == [0]  # refused once, never tried again
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)


def test_a_write_error_is_the_stores_and_a_write_after_close_is_dropped(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT, 0o600)  # not open for writing: EBADF
    try:
        writer = PieceWriter(fd, OBJ, direct=lambda: False, turns=WriteTurns())
        with pytest.raises(StoreError) as e:
            writer.write(b"x" * ALIGN, 0)
        assert e.value.errno == errno.EBADF and "cannot write it to the store" in str(e.value)
        writer.close()
        with pytest.raises(WriterClosed):
            writer.write(b"late", 0)
    finally:
        os.close(fd)


def test_once_a_reader_is_served_the_next_pieces_go_through_the_page_cache(tmp_path: Path) -> None:
    """The download asks per piece: a handle that reads the file as it
    fills arrives halfway, and the pieces after it are written buffered."""
    data = os.urandom(2 * MiB)
    fd = _file(tmp_path, len(data))
    if not _direct_works(tmp_path / "f.part"):
        pytest.skip("the test folder's filesystem refuses O_DIRECT")
    served = False
    before = STATS.direct_bytes
    try:
        with PieceWriter(fd, OBJ, direct=lambda: not served, turns=WriteTurns()) as writer:
            writer.write(data[:MiB], 0)
            served = True
            writer.write(data[MiB:], MiB)
        assert STATS.direct_bytes - before == MiB
        assert not _cached(fd, 0, MiB) and _cached(fd, MiB, MiB)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)


def test_close_waits_for_a_write_under_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once `close` returns, the request's descriptor may name another file
    (the download's, once every pin is gone): no write of the request may
    still be going.  Any change to how writers take turns must keep this."""
    fd = _file(tmp_path, MiB)
    entered, release = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def held_pwrite(wfd: int, buf: object, offset: int) -> int:
        entered.set()
        assert release.wait(10), "the held write was never released"
        return real_pwrite(wfd, buf, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(storewrite.os, "pwrite", held_pwrite)
    writer = PieceWriter(fd, OBJ, direct=lambda: False, turns=WriteTurns())
    try:
        writing = threading.Thread(target=writer.write, args=(b"x" * ALIGN, 0), daemon=True)
        writing.start()
        assert entered.wait(10)
        closing = threading.Thread(target=writer.close, daemon=True)
        closing.start()
        closing.join(0.3)
        assert closing.is_alive(), "close returned with a write under way"
        release.set()
        closing.join(10)
        writing.join(10)
        assert not closing.is_alive() and os.pread(fd, 1, 0) == b"x"
        with pytest.raises(WriterClosed):
            writer.write(b"late", 0)
    finally:
        release.set()
        os.close(fd)


def test_a_download_file_big_or_small_is_preallocated(tmp_path: Path) -> None:
    big, small = 9 * MiB, MiB
    fd_big, fd_small = _file(tmp_path, big), os.open(tmp_path / "s.part", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd_small, small)
        if not can_allocate(tmp_path):
            pytest.skip("the test folder's filesystem cannot allocate blocks up front")
        assert storewrite.preallocate(fd_big, big)
        assert os.fstat(fd_big).st_blocks * 512 >= big
        assert os.fstat(fd_big).st_size == big and os.pread(fd_big, MiB, 4 * MiB) == bytes(MiB)  # zeros
        assert storewrite.preallocate(fd_small, small)  # its room taken before a byte is fetched (storeroom.py)
        assert os.fstat(fd_small).st_blocks * 512 >= small
    finally:
        os.close(fd_big)
        os.close(fd_small)


def _held_write(monkeypatch: pytest.MonkeyPatch, fd: int, turns: WriteTurns, direct: bool,
                refused: bool = False) -> tuple[threading.Thread, threading.Event]:
    """A write of a page of b"x" at offset 0, held in its pwrite until the
    event is set (direct writes go through a duplicate of `fd`: any filesystem;
    `refused`: the writer's earlier piece found O_DIRECT refused)."""
    entered, release = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def pwrite(wfd: int, buf: object, offset: int) -> int:
        if offset == 0:
            entered.set()
            assert release.wait(10), "the held write was never released"
        return real_pwrite(wfd, buf, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(storewrite.os, "pwrite", pwrite)
    monkeypatch.setattr(storewrite, "_reopen_direct", lambda _fd: -1 if refused else os.dup(fd))
    writer = PieceWriter(fd, OBJ, direct=lambda: direct, turns=turns)
    if refused:
        writer.write(b"r" * ALIGN, 8 * MiB)
    held = threading.Thread(target=writer.write, args=(b"x" * ALIGN, 0), daemon=True)
    held.start()
    assert entered.wait(10)
    return held, release


def _another_write(turns: WriteTurns, fd: int, offset: int, direct: bool) -> threading.Thread:
    """Another request's write of a page of b"y" at `offset`, under way."""
    writer = PieceWriter(fd, OBJ, direct=lambda: direct, turns=turns)
    thread = threading.Thread(target=writer.write, args=(b"y" * ALIGN, offset), daemon=True)
    thread.start()
    return thread


def _goes_past(thread: threading.Thread) -> bool:
    """Whether the write finishes while the held one waits."""
    thread.join(0.3)
    return not thread.is_alive()


@pytest.mark.parametrize("separate", [True, False])
def test_writers_of_one_file_take_turns_only_where_they_must(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             separate: bool) -> None:
    """In a preallocated file (`separate`), a direct write waits only for
    writers of its own 1 MiB stripe; in a sparse file, and for buffered
    writes, one write goes at a time (the kernel would make them wait for the
    inode's lock anyway, spinning)."""
    fd = _file(tmp_path, 16 * MiB)
    turns = WriteTurns(separate=separate)
    held, release = _held_write(monkeypatch, fd, turns, direct=True)
    try:
        elsewhere = _another_write(turns, fd, 2 * MiB, direct=True)
        assert _goes_past(elsewhere) == separate
        same_stripe = _another_write(turns, fd, MiB - ALIGN, direct=True)
        assert not _goes_past(same_stripe)
        release.set()
        for thread in (held, elsewhere, same_stripe):
            thread.join(10)
        assert os.pread(fd, ALIGN, 0) == b"x" * ALIGN
        assert os.pread(fd, ALIGN, MiB - ALIGN) == os.pread(fd, ALIGN, 2 * MiB) == b"y" * ALIGN
    finally:
        release.set()
        os.close(fd)


def test_buffered_writes_take_turns_with_each_other_in_a_preallocated_file(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fd = _file(tmp_path, 16 * MiB)
    turns = WriteTurns(separate=True)
    held, release = _held_write(monkeypatch, fd, turns, direct=False)
    try:
        buffered = _another_write(turns, fd, 4 * MiB, direct=False)
        assert not _goes_past(buffered)
        assert _goes_past(_another_write(turns, fd, 8 * MiB, direct=True))  # a direct one elsewhere does not wait
        release.set()
        buffered.join(10)
        assert os.pread(fd, ALIGN, 4 * MiB) == b"y" * ALIGN
    finally:
        release.set()
        held.join(10)
        os.close(fd)


def test_a_download_file_the_disk_cannot_hold_whole_is_given_back_its_blocks(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """fallocate(2) may take part of the space before it finds no more: a
    new file then holds nothing, and the caller hears ENOSPC (refused)."""
    size = 16 * MiB
    fd = _file(tmp_path, size)

    def half_then_full(fd_: int, mode: int, offset: int, length: int) -> int:
        os.posix_fallocate(fd_, offset, length // 2)
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(storewrite, "_fallocate", lambda: half_then_full)
    try:
        with pytest.raises(OSError) as info:
            storewrite.preallocate(fd, size)
        assert info.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_blocks == 0
    finally:
        os.close(fd)


def test_a_writer_refused_o_direct_takes_turns_as_a_buffered_one(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """On a filesystem that can allocate but refuses O_DIRECT (tmpfs before
    6.6), every write is buffered, so it takes the file's lock."""
    fd = _file(tmp_path, 16 * MiB)
    turns = WriteTurns(separate=True)
    held, release = _held_write(monkeypatch, fd, turns, direct=True, refused=True)
    try:
        buffered = _another_write(turns, fd, 4 * MiB, direct=False)
        assert not _goes_past(buffered)
        release.set()
        buffered.join(10)
    finally:
        release.set()
        held.join(10)
        os.close(fd)
