"""The kernel's mount table: find a mount, probe whether its daemon is alive,
unmount, tune its readahead.  No pyfuse3 here: `umount`, `status` and
`doctor` use it too."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import LazyfsError

log = logging.getLogger(__name__)


class MountError(LazyfsError):
    """The mount could not be set up (exit code 1)."""

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor"


def _mounts() -> list[MountEntry]:
    """Every mount in /proc/self/mountinfo, in its order (a later entry for a path is on top)."""
    entries = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                entries.append(MountEntry(_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2]),
                                          fields[2]))
    except OSError:
        return []
    return entries


def find_mount(path: str | Path) -> MountEntry | None:
    """The mount whose mountpoint is exactly `path`, from /proc/self/mountinfo."""
    target = os.path.abspath(path)
    found = [entry for entry in _mounts() if entry.mountpoint == target]
    return found[-1] if found else None


def mount_at(path: str | Path) -> MountEntry | None:
    """The mount at `path`, or where the symlinks on the way lead (`lazyfs
    umount LINK`), following none inside a FUSE mount (that could hang)."""
    target = os.path.abspath(path)
    found = find_mount(target)
    if found is None:
        real = _resolved_outside(target, [e.mountpoint for e in _mounts() if e.fstype.startswith("fuse")])
        found = find_mount(real) if real != target else None
    return found


def is_lazyfs_mount(path: str | Path) -> bool:
    """Is a lazyfs mount's mountpoint exactly `path` (a look at the mount table, not at the path)?"""
    entry = find_mount(path)
    return entry is not None and entry.fstype == "fuse.lazyfs"


def device_name(dev: int) -> str:
    """A device number (a file's st_dev) as /proc/self/mountinfo writes it."""
    return f"{os.major(dev)}:{os.minor(dev)}"


def fstype_of_device(dev: int) -> str | None:
    """The type of the filesystem with device number `dev` (a file's st_dev),
    from /proc/self/mountinfo; None when no mount here has it."""
    device = device_name(dev)
    found = [entry.fstype for entry in _mounts() if entry.device == device]
    return found[-1] if found else None


def is_fuse_mount(path: str | Path) -> bool:
    """Whether a FUSE mount sits at `path`, from the mount table alone: such a
    mount may be dead or hung, and a stat of a hung one never returns, so the
    commands look at it only through `probe_mount`."""
    entry = find_mount(path)
    return entry is not None and entry.fstype.startswith("fuse")


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


UNMOUNT_TIMEOUT_S = 30.0


def unmount(path: str | Path, lazy: bool = False) -> None:
    """Unmount a FUSE mount with fusermount3 (falling back to umount as root).
    A user with no name (a uid /etc/passwd does not list: an arbitrary-UID
    container) is one fusermount3 refuses to act for ("could not determine
    username"): with CAP_SYS_ADMIN, which such a container's mount needed,
    the kernel is asked directly (umount2(2), as fusermount3 asks it as
    root); without it the line says so, and what does work."""
    if not _named():
        _unmount_unnamed(path, lazy)
        return
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(path)]
    try:
        try:
            res = subprocess.run(args, capture_output=True, text=True, timeout=UNMOUNT_TIMEOUT_S)
        except FileNotFoundError:
            res = subprocess.run(["umount"] + (["-l"] if lazy else []) + [str(path)],
                                 capture_output=True, text=True, timeout=UNMOUNT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise MountError(f"unmounting {path} did not finish in {UNMOUNT_TIMEOUT_S:.0f} s; "
                         f"try: lazyfs umount --force {path}") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        line = msg[-1] if msg else f"unmounting {path} failed"
        if not lazy and "busy" in line.lower():  # fusermount3 and umount say "Device or resource busy"
            line += _busy(path)
        raise MountError(line)


def _busy(path: str | Path) -> str:
    return f"; files on it are open: close them, or detach it now and let them finish: lazyfs umount --lazy {path}"


def _named() -> bool:
    """Has this process's user a name (a passwd entry, as fusermount3 looks it up)?"""
    try:
        pwd.getpwuid(os.getuid())
    except KeyError:
        return False
    return True


def _unmount_unnamed(path: str | Path, lazy: bool) -> None:
    uid = os.getuid()
    if not has_cap_sys_admin():
        raise MountError(f"cannot unmount {path}: this user (uid {uid}) has no name (no entry in /etc/passwd), and "
                         "fusermount3 unmounts only for a named user; run lazyfs umount with CAP_SYS_ADMIN (as the "
                         f"mount itself had it), give uid {uid} a passwd entry, or stop the mount's daemon with "
                         "SIGTERM (it unmounts and exits 0)", errno.EPERM)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(os.path.abspath(path)), _UMOUNT_NOFOLLOW | (_MNT_DETACH if lazy else 0)) != 0:
        err = ctypes.get_errno()
        raise MountError(f"cannot unmount {path}: {os.strerror(err)}" + (_busy(path) if err == errno.EBUSY else ""),
                         err)


def has_cap_sys_admin() -> bool:
    """Has this process CAP_SYS_ADMIN (in its effective set)?"""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            effective = next(line for line in f if line.startswith("CapEff:")).split()[1]
    except (OSError, StopIteration, IndexError):
        return os.geteuid() == 0
    return bool(int(effective, 16) & (1 << 21))  # CAP_SYS_ADMIN


_MNT_FORCE, _MNT_DETACH, _UMOUNT_NOFOLLOW = 1, 2, 8


def abort_and_detach(path: str | Path) -> None:
    """`umount -f -l` for a FUSE mount: the kernel aborts the mount's connection
    (every request waiting on its daemon fails at once, ECONNABORTED; later ones
    ENOTCONN; the daemon's next read of /dev/fuse ends its loop), then detaches
    it.  The one way out of a mount whose daemon is stopped, hung, or killed while
    a thread of it was stuck in the kernel: a plain (even lazy) unmount leaves
    the processes waiting on it blocked.  A direct umount2(2), because umount(8)
    and fusermount3 look the path up first, which a hung mount may never answer.
    Needs CAP_SYS_ADMIN, as mounting does."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(os.path.abspath(path)), _MNT_FORCE | _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        needs = " (it needs root or CAP_SYS_ADMIN, as mounting does)" if err == errno.EPERM else ""
        raise MountError(f"could not force the unmount of {path}: {os.strerror(err)}{needs}")


PROBE_TIMEOUT_S = 5.0


def probe_mount(path: Path, timeout: float = PROBE_TIMEOUT_S) -> int | None:
    """statvfs the mount from a helper thread (a hung daemon must not hang us).
    Returns 0 when it answers, the errno when it fails, None on timeout."""
    result: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(path)  # never answered from the kernel's attribute cache
            result.append(0)
        except OSError as e:
            result.append(e.errno or errno.EIO)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else None


@dataclass(frozen=True)
class BrokenMount:
    """A FUSE mount that cannot serve a path on it: its daemon died (the
    kernel answers ENOTCONN at once: a stale mount) or does not answer (a
    stat would wait for ever: stopped, hung, or killed while a thread of it
    was stuck in the kernel)."""

    entry: MountEntry
    dead: bool

    @property
    def what(self) -> str:
        if self.dead:
            return "a stale mount (its daemon died)"
        return f"a {self.entry.fstype} mount that is not responding"

    @property
    def fix(self) -> str:
        """The command that clears it: a dead mount needs only a (lazy)
        unmount, one that does not answer its connection aborted."""
        if self.dead:
            return f"fusermount3 -uz {self.entry.mountpoint}"
        return f"lazyfs umount --force {self.entry.mountpoint}"


def broken_mount_holding(path: str | Path) -> BrokenMount | None:
    """The FUSE mount `path` is on or anywhere below, if its daemon died or
    does not answer (a stat of the path, or an open, would fail with
    ENOTCONN, or wait for ever).  Found by name in the mount table, following
    the symlinks on the way that lie outside FUSE mounts (nothing on one is
    looked up: that could hang too)."""
    entries = _mounts()
    fuse = [entry for entry in entries if entry.fstype.startswith("fuse")]
    target = os.path.abspath(path)
    candidates = {target, _resolved_outside(target, [entry.mountpoint for entry in fuse])}
    for entry in fuse:
        if not any(_on_or_below(p, entry.mountpoint) for p in candidates):
            continue
        state = probe_mount(Path(entry.mountpoint))
        if state is None or state == errno.ENOTCONN:
            return BrokenMount(entry, dead=state == errno.ENOTCONN)
    return None


def _on_or_below(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


_MAX_SYMLINKS = 40  # as the kernel's ELOOP


def _resolved_outside(path: str, fuse_mounts: list[str]) -> str:
    """Absolute `path` with its symlinks resolved, as the kernel would, up to
    the first component on a FUSE mount (or missing): the rest is kept as
    written, never looked up."""
    parts = path.split("/")[1:]
    done, hops = "/", 0
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            done = os.path.dirname(done)
            continue
        step = os.path.join(done, name)
        if any(_on_or_below(step, m) for m in fuse_mounts):
            return os.path.join(step, *parts)
        try:
            if not os.path.islink(step) or hops >= _MAX_SYMLINKS:
                done = step
                continue
            link = os.readlink(step)
        except OSError:
            return os.path.join(step, *parts)
        hops += 1
        parts = link.split("/") + parts
        if link.startswith("/"):
            done = "/"
    return done


def check_answering(path: str | Path, what: str) -> None:
    """Refuse a path on a FUSE mount whose daemon died or does not answer
    (broken_mount_holding), with the fix."""
    broken = broken_mount_holding(path)
    if broken is None:
        return
    where = on_mount(path, broken.entry.mountpoint)
    if broken.dead:
        raise MountError(f"{what} {path} {where} {broken.what}; run: {broken.fix}")
    raise MountError(f"{what} {path} {where} {broken.what}; if its daemon is gone or hung, run: {broken.fix}")


def on_mount(path: str | Path, mountpoint: str) -> str:
    """"is on MNT,", or "is" for the mountpoint itself ("/mnt is a stale mount", not "/mnt is on /mnt, a ...")."""
    return "is" if os.path.normpath(str(path)) == os.path.normpath(mountpoint) else f"is on {mountpoint},"


def check_mountpoint(path: Path) -> None:
    """Refuse a live mount; clean up a dead one (ENOTCONN) left by a crash, and a
    lazyfs mount that does not answer."""
    entry = find_mount(path)
    if entry is None or not entry.fstype.startswith("fuse"):
        return
    state = probe_mount(path)
    if state == errno.ENOTCONN:
        log.warning("%s is a stale mount left by a process that died; unmounting it", path)
        try:
            unmount(path, lazy=True)
        except MountError as e:
            raise MountError(f"{path} is a stale mount and could not be cleaned up ({e}); "
                             f"run: fusermount3 -uz {path}") from None
        return
    if state is None and entry.fstype == "fuse.lazyfs":
        # A lazyfs daemon answers statvfs from its event loop in milliseconds,
        # whatever its downloads do; silence for seconds means it is stopped,
        # hung, or dead with a thread stuck in the kernel (then no process will
        # ever answer, and a restarted sidecar would fail here forever).
        log.warning("%s is a lazyfs mount that has not answered for %.0f s; aborting its connection "
                    "and mounting over it", path, PROBE_TIMEOUT_S)
        try:
            abort_and_detach(path)
        except MountError as e:
            raise MountError(f"{path} is a lazyfs mount that does not answer; {e}") from None
        return
    if state is None:
        raise MountError(f"{path} is mounted ({entry.fstype}) but not responding; "
                         f"if its daemon is gone or hung, run: lazyfs umount --force {path}")
    raise MountError(f"{path} is already mounted ({entry.fstype} from {entry.source}); "
                     f"unmount it first: lazyfs umount {path}")


def set_read_ahead(mountpoint: Path, nbytes: int) -> None:
    """Raise the mount's kernel readahead (128 KiB by default for FUSE).

    With 1 MiB, sequential reads and mmap faults arrive as 1 MiB requests (the
    most one FUSE request carries) instead of 128-256 KiB ones: four to eight
    times fewer round trips through Python for the same bytes, measured about
    1.5x faster on a warm first read.  Needs root; silently skipped otherwise."""
    if nbytes <= 0:
        return
    entry = find_mount(mountpoint)
    if entry is None:
        return
    try:
        with open(f"/sys/class/bdi/{entry.device}/read_ahead_kb", "w") as f:
            f.write(str(max(4, nbytes // 1024)))
    except OSError as e:
        log.debug("could not set readahead of %s: %s", mountpoint, e)


def set_background(mountpoint: Path, requests: int) -> None:
    """Let the kernel keep more read requests in flight to the daemon (FUSE's
    `max_background`, 12 by default): readahead of several files, or of one
    file read ahead far, then waits on the daemon's threads and the network
    instead of on this limit.  Needs root and the fusectl filesystem
    (/sys/fs/fuse/connections); silently skipped otherwise."""
    entry = find_mount(mountpoint)
    if entry is None:
        return
    major, _, minor = entry.device.partition(":")
    # fusectl names a connection by the mount's device number.
    folder = Path("/sys/fs/fuse/connections") / str(os.makedev(int(major), int(minor)))
    try:
        (folder / "max_background").write_text(str(requests))
        (folder / "congestion_threshold").write_text(str(requests * 3 // 4))
    except OSError as e:
        log.debug("could not raise the background requests of %s: %s", mountpoint, e)
