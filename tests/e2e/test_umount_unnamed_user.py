"""`lazyfs umount` as a user with no name: a uid /etc/passwd does not list, as
arbitrary-UID containers (OpenShift) run with.  fusermount3 refuses to act
for such a user ("could not determine username"); before, that was
lazyfs's whole line, exit 1.  Now, with CAP_SYS_ADMIN (which such a
container's mount needs anyway) lazyfs asks the kernel itself (umount2) and
the mount goes, the daemon exiting 0; without it the line says what is wrong
and what works instead."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from support.mounting import Mounter, lazyfs_cli
from support.mountproc import force_unmount, is_mounted

pytestmark = pytest.mark.fuse


def unnamed_uid() -> int:
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def as_unnamed(*caps: str) -> list[str]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("acting as another user needs root and setpriv (util-linux)")
    uid = str(unnamed_uid())
    given = [f"--inh-caps=+{c}" for c in caps] + [f"--ambient-caps=+{c}" for c in caps]
    return ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", *given, "--"]


@pytest.fixture
def open_mountpoint() -> Iterator[Path]:
    """A mountpoint any user can reach (the tests' own folders are root's, 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="lazyfs-unnamed-"))
    folder.chmod(0o755)
    (folder / "mnt").mkdir(mode=0o755)
    try:
        yield folder / "mnt"
    finally:
        force_unmount(folder / "mnt")
        if not is_mounted(folder / "mnt"):
            shutil.rmtree(folder)


@pytest.mark.parametrize("lazy", [False, True])
def test_an_unnamed_user_with_cap_sys_admin_unmounts(open_mountpoint: Path, mount: Mounter, s3: object,
                                                    bucket: str, lazy: bool) -> None:
    m = mount("--prefix", f"s3://{bucket}/models/m", mountpoint=open_mountpoint)
    res = lazyfs_cli(["umount", str(m.path), *(["--lazy"] if lazy else [])], wrapper=as_unnamed("sys_admin"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == f"lazyfs: unmounted {m.path}", res.stdout
    assert m.process.proc.wait(15) == 0
    assert not is_mounted(m.path)


def test_an_unnamed_user_without_it_is_told_why_and_what_works(open_mountpoint: Path, mount: Mounter, s3: object,
                                                               bucket: str) -> None:
    m = mount("--prefix", f"s3://{bucket}/models/m", mountpoint=open_mountpoint)
    res = lazyfs_cli(["umount", str(m.path)], wrapper=as_unnamed())
    assert res.returncode == 1, res.stdout + res.stderr
    [line] = res.stderr.splitlines()
    uid = unnamed_uid()
    assert line == (f"lazyfs: error: cannot unmount {m.path}: this user (uid {uid}) has no name (no entry in "
                    "/etc/passwd), and fusermount3 unmounts only for a named user; run lazyfs umount with "
                    f"CAP_SYS_ADMIN (as the mount itself had it), give uid {uid} a passwd entry, or stop the mount's "
                    "daemon with SIGTERM (it unmounts and exits 0)"), line
    assert is_mounted(m.path) and m.process.proc.poll() is None  # (left as it was)
