"""Page-cache helpers for tests."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import pytest

# `echo 2 > /proc/sys/vm/drop_caches` (test_posix_view) makes the whole machine's
# kernel forget its unused inodes, and their cached pages with them.  The tests
# that drop them and those that assert pages or inodes the kernel kept share
# one worker of a parallel run (pytest-xdist --dist loadgroup, scripts/test),
# so that one never runs while the other does.
KERNEL_CACHES = pytest.mark.xdist_group("kernel-caches")


def drop_from_page_cache(path: Path) -> None:
    """Evict a file's pages, as after a restart: the next read goes to its filesystem.
    Written back first: the kernel keeps dirty pages and pages under writeback
    through POSIX_FADV_DONTNEED.  And asked again until none is left: pages
    still held in another CPU's batch of recently used pages are passed over
    too (a test of what a read brings in then finds a chunk already there)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        deadline = time.monotonic() + 5
        while True:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            left = cached_pages(path)
            if not left:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: {left} pages stay in the page cache after POSIX_FADV_DONTNEED")
            time.sleep(0.01)
    finally:
        os.close(fd)


def cached_pages(path: Path) -> int:
    """How many of a file's pages the page cache holds (mincore of a mapping
    that is never touched: asking changes nothing, where a RWF_NOWAIT read of
    a page not cached starts reading it in)."""
    size = path.stat().st_size
    if not size:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)  # (writable, so ctypes can take its address)
    finally:
        os.close(fd)
    anchor = ctypes.c_char.from_buffer(mapping)  # (released before the mapping is closed)
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec)
    finally:
        del anchor
        mapping.close()
