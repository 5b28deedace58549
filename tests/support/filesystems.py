"""What the test folder's filesystem can do."""

from __future__ import annotations

import subprocess
from pathlib import Path


def can_allocate(folder: Path) -> bool:
    """Whether `folder`'s filesystem allocates a file's blocks up front
    (util-linux's fallocate(1), which never falls back to writing zeros)."""
    probe = folder / "fallocate-probe"
    try:
        return subprocess.run(["fallocate", "-l", "1M", str(probe)], capture_output=True, timeout=30).returncode == 0
    finally:
        probe.unlink(missing_ok=True)
