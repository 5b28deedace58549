"""What the test folder's filesystem can do."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


def can_allocate(folder: Path) -> bool:
    """Whether `folder`'s filesystem allocates a file's blocks up front
    (util-linux's fallocate(1), which never falls back to writing zeros)."""
    probe = folder / "fallocate-probe"
    try:
        return subprocess.run(["fallocate", "-l", "1M", str(probe)], capture_output=True, timeout=30).returncode == 0
    finally:
        probe.unlink(missing_ok=True)


def mounted_tmpfs(path: Path, options: str, what: str) -> contextlib.AbstractContextManager[Path]:
    """A tmpfs at `path` (made) with mount `options` (see `mounted`)."""
    return mounted(path, "tmpfs", options, what)


@contextlib.contextmanager
def mounted(path: Path, fstype: str, options: str, what: str) -> Iterator[Path]:
    """A filesystem of `fstype` (tmpfs, ramfs) at `path` (made) with mount
    `options`, unmounted at the end (mounting one needs CAP_SYS_ADMIN, as FUSE
    does).  Where none can be mounted the test is skipped, but fails under CI,
    where `what` (the test that needs it) must run."""
    path.mkdir()
    res = subprocess.run(["mount", "-t", fstype, "-o", options, fstype, str(path)], capture_output=True, text=True,
                         timeout=30)
    if res.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"{what} must run in CI, but a {fstype} cannot be mounted here ({res.stderr.strip()})")
        pytest.skip(f"a {fstype} cannot be mounted here ({res.stderr.strip() or res.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
