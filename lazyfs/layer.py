"""A directory tree opened by descriptor: the store, or a prebaked layer.

Every path is resolved one component at a time with openat(O_NOFOLLOW) under
the layer's descriptor, so a symlink planted in it is never followed and
nothing is read or written outside it.  Because the store's descriptor is
opened before the mount covers it, the daemon never touches its own
mountpoint (which would deadlock).

All functions block: call them from worker threads.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import stat
import threading
from dataclasses import dataclass
from typing import Iterable

from lazyfs.errors import StoreError
from lazyfs.exhausted import DESCRIPTOR_ERRNOS, strerror
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted where a file should be must not hang the open.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# Folders only the daemon's user may enter (the store's metadata, downloads).
PRIVATE = 0o700


@dataclass(frozen=True, slots=True)
class Permissions:
    """Modes of what lazyfs creates in a store (--store-mode): the folders, and
    the published files in them.  "private" by default: the mount decides who
    reads the files (--allow-other), not the mode bits of the store beneath."""

    folder: int
    file: int
    # Execute bits of published files (bake's and a mount's --file-mode): S3 keeps no mode, so a file is
    # executable only when asked for, and then by whoever may read it; metadata files never are.
    executable: int = 0

    def with_exec(self, file_mode: int) -> Permissions:
        return dataclasses.replace(self, executable=exec_bits(file_mode, self.file))


STORE_MODES = {
    "private": Permissions(0o700, 0o400),
    "group": Permissions(0o750, 0o440),  # the daemon's group may read the store
    "public": Permissions(0o755, 0o444),  # anyone who can reach the store (lazyfs before --store-mode)
}


def exec_bits(mode: int, readable: int) -> int:
    """The execute bits of `mode` for whoever `readable` lets read (0o444 -> 0o111)."""
    return mode & 0o111 & ((readable & 0o444) >> 2)


class Layer:
    def __init__(self, fd: int, path: str, writable: bool, label: str) -> None:
        self.fd = fd
        self.path = path
        self.writable = writable
        self.label = label  # "store" or "prebaked layer", as logs and `status` say
        self._told_unreadable = False  # a file or folder we may not read was logged (once per layer)

    @classmethod
    def open(cls, path: str, writable: bool, label: str, create_mode: int | None = None) -> Layer:
        """With `create_mode`, a missing folder is made (its parents as `mkdir -p`
        would), itself with exactly that mode."""
        try:
            if create_mode is not None:
                _make_root(path, create_mode)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot open {label} {path}: {strerror(e)}", e.errno or errno.EIO) from None
        return cls(fd, path, writable, label)

    def close(self) -> None:
        os.close(self.fd)

    def open_dir(self, parts: Iterable[str], create: bool = False, mode: int = PRIVATE) -> int:
        """A descriptor of the directory at `parts` under this layer (caller closes).
        With `create`, missing directories are made with exactly `mode` (not
        narrowed by the umask: it is what --store-mode asked for), and a stale
        file or symlink standing where a directory must be is removed."""
        fd = os.dup(self.fd)
        walked: list[str] = []  # the path so far, for the log line: the store path, not its last part
        try:
            for part in parts:
                walked.append(part)
                try:
                    nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if not create or e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        raise
                    if e.errno != errno.ENOENT:
                        log.warning("%s: removing %s, which stands where a folder must be",
                                    self.label, quoted("/".join(walked)))
                        os.unlink(part, dir_fd=fd)
                    made = _mkdir(fd, part, mode)
                    nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                    if made:
                        os.fchmod(nfd, mode)  # ours: no privilege needed
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def open_file(self, path: str, strict: bool = False) -> int | None:
        """A read-only descriptor of the regular file at `path`, or None when there
        is none (missing, a directory, a symlink, a device or FIFO).  `strict`,
        for a report of what is on disk (status, a file's state): a descriptor
        refused (EMFILE, ENFILE) says nothing of the file, and is raised."""
        *dirs, name = path.split("/")
        try:
            dfd = self.open_dir(dirs)
        except OSError as e:
            if strict and e.errno in DESCRIPTOR_ERRNOS:
                raise
            self._unreadable(path, e)
            return None
        try:
            fd = os.open(name, FILE_FLAGS, dir_fd=dfd)
        except OSError as e:
            if strict and e.errno in DESCRIPTOR_ERRNOS:
                raise
            if e.errno == errno.ELOOP:
                log.warning("%s: ignoring symlink at %s", self.label, quoted(path))
            self._unreadable(path, e)
            return None
        finally:
            os.close(dfd)
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except BaseException:
            os.close(fd)
            raise
        if not regular:
            os.close(fd)
            return None
        return fd

    def _unreadable(self, path: str, e: OSError) -> None:
        """A copy we may not read is one we do not have: S3's is fetched. Said
        once per layer (an image built with the wrong owner would say it of
        every file), so that the downloads it causes are not a mystery."""
        if e.errno in (errno.EACCES, errno.EPERM) and not self._told_unreadable:
            self._told_unreadable = True
            log.warning("%s %s: cannot read %s (%s); files it cannot read are fetched from S3 instead "
                        "(check the owner and mode of its files; not said again)", self.label, self.path, path,
                        e.strerror)


def _make_root(path: str, mode: int) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)


def _mkdir(dir_fd: int, name: str, mode: int) -> bool:
    """Make a folder; False if another thread or process made it first."""
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
        return True
    except FileExistsError:
        return False


def still_there(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """Does `name` still point to the file `st` describes (not a replacement)?
    Checked right before acting on a name (unlink): a file judged through a
    descriptor may have been replaced by rename since."""
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def open_if_there(dir_fd: int, name: str) -> int | None:
    """A read-only descriptor of `name`, None where it cannot be opened (gone)."""
    try:
        return os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None


def inode_at(dir_fd: int, name: str) -> int | None:
    """The inode `name` points to now, None if it is gone."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino
    except FileNotFoundError:
        return None


def removed(fd: int) -> bool:
    """Was the folder (or file) `fd` names removed: has it no name left?"""
    return os.fstat(fd).st_nlink == 0


def remove_if_same(dir_fd: int, name: str, fd: int) -> None:
    """Unlink `name` if it still names the open file `fd`: a folder made
    again since (storeheal.py) may hold another's file under that name."""
    if inode_at(dir_fd, name) == os.fstat(fd).st_ino:
        remove(dir_fd, name)


def if_inode(fd: int, ino: int) -> int | None:
    """`fd` if it is the file `ino` names (closed, and None, if the name holds
    another file by now)."""
    try:
        same = os.fstat(fd).st_ino == ino
    except BaseException:
        os.close(fd)
        raise
    if not same:
        os.close(fd)
        return None
    return fd


def flock_held(dir_fd: int, name: str) -> bool:
    """Does some process hold an exclusive flock on `name` right now?  A look
    that changes nothing: the name is opened read-only and never created (a
    read-only store, or one without the file, stays as it is); a shared lock
    tried without waiting is refused while an exclusive one is held, and one
    granted is dropped at once.  (In that instant, a process trying for the
    exclusive lock finds it taken: where a lock file was left with no
    holder, a mount opening the file follows a download nobody runs until
    its next look, 0.2 s later, takes it over: coop.py.)  False where the
    file cannot be opened (absent, or not this user's to read)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # a file flock refuses (not a lock file lazyfs made)
    finally:
        os.close(fd)  # drops a shared lock granted
    return False


def remove(dir_fd: int, name: str) -> None:
    """Unlink `name` if it is there."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def write_small(dir_fd: int, name: str, data: bytes, mode: int = 0o600) -> None:
    """Replace a small file atomically and durably (write a sibling, fsync,
    rename over).  The sibling is removed if anything fails, so a full disk
    leaves no temporary file behind."""
    tmp = f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)  # exactly `mode`, not narrowed by the umask (a sidecar's --store-mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        remove(dir_fd, tmp)
        raise
