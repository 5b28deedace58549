"""Reading a store file back to hash it (readback.py): what the page cache
does not hold comes straight from the disk and stays out of it; what it
holds is read from it; any range, aligned or not, hashes right."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from lazyfs import readback, residency
from lazyfs.errors import IntegrityError
from support.pagecache import cached_pages, drop_from_page_cache

CHUNK = readback.CHUNK
SIZE = 3 * CHUNK + 12345  # several reads and a ragged end


def never_cancelled() -> bool:
    return False


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[tuple[Path, int, bytes]]:
    """A file as a download leaves it, and a descriptor of it."""
    path = tmp_path / "blob"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield path, fd, data
    os.close(fd)


def takes_direct_reads(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return readback.in_page_cache(fd, 0, 1) is not None
    finally:
        os.close(fd)


def md5_of(fd: int, start: int, end: int) -> str:
    h = hashlib.md5()
    readback.read_into(fd, start, end, h, never_cancelled)
    return h.hexdigest()


def test_what_the_page_cache_does_not_hold_is_read_from_the_disk_and_stays_out_of_it(
        tmp_path: Path) -> None:
    path = tmp_path / "big"
    data = os.urandom(8 * CHUNK + 12345)
    path.write_bytes(data)
    if not takes_direct_reads(path):
        pytest.skip("the test's filesystem takes no direct reads (or cannot say what is cached)")
    drop_from_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert md5_of(fd, 0, len(data)) == hashlib.md5(data).hexdigest()
        assert md5_of(fd, 7, len(data)) == hashlib.md5(data[7:]).hexdigest()  # (an unaligned start too)
        counted = residency._cachestat(fd, 0, len(data)) is not None
    finally:
        os.close(fd)
    if counted:  # asking read nothing in, and direct reads fill no page cache
        assert cached_pages(path) == 0, "hashing pulled pages of the file into the page cache"
    else:
        # Asked by RWF_NOWAIT reads (residency.py): a page per chunk asked about, and
        # now and then a chunk that passed for cached, read through the page cache.
        # Read through the page cache, all of it would be.
        assert cached_pages(path) < len(data) // 4096 // 4, "hashing pulled the file into the page cache"


def test_what_the_page_cache_holds_is_read_from_it(stored: tuple[Path, int, bytes],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, fd, data = stored
    assert cached_pages(path) == -(-SIZE // 4096), "not cached after it was written"
    reads: list[int] = []
    real = os.preadv

    def recording(rfd: int, buffers: Any, offset: int, *flags: int) -> int:
        if not flags:
            reads.append(rfd)
        return real(rfd, buffers, offset, *flags)

    monkeypatch.setattr(readback.os, "preadv", recording)
    assert md5_of(fd, 0, SIZE) == hashlib.md5(data).hexdigest()
    assert reads and set(reads) == {fd}, "a cached file was read around the page cache"


@pytest.mark.parametrize("start,end", [(0, 1), (1, CHUNK + 7), (4096, 2 * CHUNK), (CHUNK + 7, SIZE - 3),
                                       (SIZE - 3, SIZE), (2 * CHUNK, SIZE), (0, SIZE)])
def test_any_range_hashes_right_from_the_disk(stored: tuple[Path, int, bytes], start: int, end: int) -> None:
    path, fd, data = stored
    drop_from_page_cache(path)
    assert md5_of(fd, start, end) == hashlib.md5(data[start:end]).hexdigest()


def test_a_file_shorter_than_the_range_is_an_integrity_error(stored: tuple[Path, int, bytes]) -> None:
    path, fd, _ = stored
    drop_from_page_cache(path)
    with pytest.raises(IntegrityError):
        md5_of(fd, 2 * CHUNK, SIZE + 4096)


def test_a_filesystem_that_opens_for_direct_reads_but_refuses_them_is_read_through_the_page_cache(
        stored: tuple[Path, int, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, fd, data = stored
    drop_from_page_cache(path)
    monkeypatch.setattr(readback, "_refused", threading.Event())
    real = os.preadv
    refused: list[int] = []

    def refusing(rfd: int, buffers: Any, offset: int, *flags: int) -> int:
        if fcntl.fcntl(rfd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(rfd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(rfd, buffers, offset, *flags)

    monkeypatch.setattr(readback.os, "preadv", refusing)
    # No read-ahead: the chunks after the refused one are not cached by its buffered read
    # (with it, they were, now and then, and the next was not asked about: flaky under load).
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    assert md5_of(fd, 0, SIZE) == hashlib.md5(data).hexdigest()
    assert md5_of(fd, 0, SIZE) == hashlib.md5(data).hexdigest()
    if takes_direct_reads(path):
        assert len(refused) == 1, "asked again after a refusal"
