"""Unit test: the daemon's malloc setting (mount.return_freed_buffers) keeps
the memory of freed replies and pieces instead of faulting it in anew."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lazyfs import mount

# 256 buffers of 1 MiB (a FUSE reply's size) made and freed one after the
# other on the main thread, and 256 of 256 KiB (a GET piece) on a worker.
REPLIES = """
import os, resource, sys, threading
from lazyfs import mount
mount.return_freed_buffers()
fd = os.open(sys.argv[1], os.O_RDONLY)
def replies(size):
    for i in range(256):
        data = os.pread(fd, size, 0)
        del data
replies(1 << 20)  # the first buffers
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
replies(1 << 20)
worker = threading.Thread(target=replies, args=(256 << 10,))
worker.start()
worker.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_replies_are_reused_not_faulted_in_again(tmp_path: Path) -> None:
    """With only the mmap threshold set, glibc's trim threshold stays at
    128 KiB: each 1 MiB reply freed atop the heap went back to the kernel and
    the next one faulted its pages in again (57,000 faults here)."""
    path = tmp_path / "blob"
    path.write_bytes(b"x" * (1 << 20))
    out = subprocess.run([sys.executable, "-c", REPLIES, str(path)], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(mount.__file__).parents[1]).stdout
    assert int(out) < 2000
