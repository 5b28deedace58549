"""Asking whether the page cache holds a range (residency.py): the answer is
exact, and asking reads nothing in."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from lazyfs import residency
from support.pagecache import cached_pages, drop_from_page_cache

CHUNK = 1024 * 1024
SIZE = 8 * CHUNK + 12345


@pytest.fixture
def dropped(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A file none of whose pages is cached, and a descriptor of it."""
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(SIZE))
    drop_from_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    yield path, fd
    os.close(fd)


def chunks() -> list[tuple[int, int]]:
    return [(start, min(SIZE, start + CHUNK)) for start in range(0, SIZE, CHUNK)]


def test_asking_about_a_file_not_cached_reads_none_of_it_in(dropped: tuple[Path, int]) -> None:
    # A one-byte RWF_NOWAIT read (the only way before cachestat) starts reading
    # the page in: asking left a page per chunk cached, and on a fast disk a
    # chunk could pass for cached.
    path, fd = dropped
    answers = [residency.cached(fd, start, end) for start, end in chunks()]
    if None in answers:
        pytest.skip("the test's filesystem cannot say what is cached")
    assert answers == [False] * len(answers)
    assert cached_pages(path) == 0, "asking what is cached read pages in"


def test_a_range_is_cached_only_when_all_of_its_pages_are(dropped: tuple[Path, int]) -> None:
    path, fd = dropped
    os.pread(fd, 4096, CHUNK)  # the chunk's first page (read-ahead may take more of it, never its last)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    os.pread(fd, 4096, 2 * CHUNK - 4096)  # and its last
    if residency.cached(fd, 0, 1) is None:
        pytest.skip("the test's filesystem cannot say what is cached")
    if cached_pages(path) >= CHUNK // 4096:
        pytest.skip("the kernel read the whole chunk ahead")
    assert residency.cached(fd, CHUNK, CHUNK + 1) is True
    assert residency.cached(fd, 2 * CHUNK - 1, 2 * CHUNK) is True
    assert residency.cached(fd, CHUNK, 2 * CHUNK) is False, "judged by its first and last pages"
    os.pread(fd, CHUNK, CHUNK)
    assert residency.cached(fd, CHUNK, 2 * CHUNK) is True
    assert residency.cached(fd, CHUNK + 7, 2 * CHUNK - 7) is True  # (unaligned: the pages it touches)
    assert residency.cached(fd, CHUNK, 2 * CHUNK + 1) is False
    os.pread(fd, 12345, 8 * CHUNK)
    assert residency.cached(fd, 8 * CHUNK, SIZE) is True  # (a ragged end)
    assert residency.cached(fd, 5, 5) is True  # (nothing asked about)


def test_a_kernel_without_cachestat_is_asked_by_reads_and_never_again(
        dropped: tuple[Path, int], monkeypatch: pytest.MonkeyPatch) -> None:
    _, fd = dropped
    calls: list[Any] = []

    def no_such_call(*args: Any) -> int:
        calls.append(args)
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(residency, "_syscall", no_such_call)
    monkeypatch.setattr(residency, "_missing", type(residency._missing)())
    os.pread(fd, CHUNK, 0)
    assert residency.cached(fd, 0, CHUNK) in (True, None)
    assert residency.cached(fd, 0, CHUNK) in (True, None)
    assert len(calls) == 1, "asked the kernel again for a call it does not have"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to drop to another user")
def test_a_file_the_process_does_not_own_is_asked_about_by_reads(tmp_path: Path) -> None:
    # Recent kernels refuse cachestat (EPERM) for a file the caller neither owns
    # nor may write.  (The store's files are the daemon's own; a prebaked
    # store may be another user's.)
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(CHUNK))
    fd = os.open(path, os.O_RDONLY)  # (handed to the other user's process: it could not open it)
    try:
        os.pread(fd, CHUNK, 0)
        code = f"from lazyfs import residency; print(residency.cached({fd}, 0, 1 << 20))"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "PYTHONPATH": str(Path(residency.__file__).parent.parent)}
        done = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                               sys.executable, "-c", code], pass_fds=(fd,),
                              capture_output=True, text=True, timeout=30, env=env, check=False)
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("True", "None")
