"""Page-cache helpers for tests."""

from __future__ import annotations

import os
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
    through POSIX_FADV_DONTNEED, which would leave part of the file cached."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
