"""Page-cache helpers for tests."""

from __future__ import annotations

import os
from pathlib import Path


def drop_from_page_cache(path: Path) -> None:
    """Evict a file's clean pages, as after a restart: the next read goes to its filesystem."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
