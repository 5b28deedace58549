"""The walk behind `--store-mode` (storemodes.py): what of a store follows
its mode, gone through once, either to give it the mode's bits (`Walk`) or
only to find who may reach it now (`Look`: the mode of a store that records
none).

What a walk covers: every folder below the store's own folder that holds a
file lazyfs published there (an identity record), or nothing at all, and
those files (their read bits; an executable copy stays executable by
whoever may read it); `.lazyfs` with its sidecar records; last the layout.
A folder holding only files lazyfs did not put there (an admin's) keeps its
mode, as do such files, `.lazyfs/tmp`, `objects` and `listings` (0700
whatever the mode).  The store's own folder (`--to`, `--store`, a
mountpoint) is only ever opened further, never narrowed: it may be a folder
of the user's.

Who may reach a thing is who may read it (a file), or enter it (a folder: its
search bits, which let a reader at the files below), and who may enter every
folder above it up to the store's own.

All functions block: call them before the mount, or from worker threads.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from dataclasses import dataclass
from typing import Callable

from lazyfs.errors import StoreError
from lazyfs.identity import SIDECAR_FOLDER, IdentityRecords
from lazyfs.layer import DIR_FLAGS, FILE_FLAGS, Layer, Permissions, exec_bits
from lazyfs.namespace import RESERVED_NAME
from lazyfs.storemeta import LAYOUT
from lazyfs.wording import quoted

# Who may reach something, from the fewest to the most, by the --store-mode that names them.
RANKS = ("private", "group", "public")
PRIVATE, GROUP, PUBLIC = range(3)
_SIDECARS = "/".join(SIDECAR_FOLDER)


def reach(st: os.stat_result) -> int:
    """Who its own bits let read a file, or enter a folder: PRIVATE (its owner),
    GROUP (its group too) or PUBLIC (anyone)."""
    bits = st.st_mode & (0o111 if stat.S_ISDIR(st.st_mode) else 0o444)
    return PUBLIC if bits & 0o007 else GROUP if bits & 0o070 else PRIVATE


def cannot_give(store: str, what: str, mode: int, e: OSError, st: os.stat_result) -> str:
    """The one line for a mode the store's `what` could not be given, with
    advice from the cause: a file of another owner is this user's to leave
    alone; one its owner (or root) may not change has an attribute that
    forbids it (chattr +i or +a)."""
    said = f"cannot give {quoted(what)} in store {store} mode {mode:04o} ({e.strerror})"
    if e.errno == errno.EROFS:
        return f"{said}: the store's filesystem is mounted read-only (serve a read-only store as --prebaked)"
    if e.errno != errno.EPERM:
        return said
    uid, path = os.geteuid(), quoted(os.path.normpath(os.path.join(store, what)))
    if uid not in (0, st.st_uid):
        return f"{said}: it belongs to uid {st.st_uid}, not to this user (uid {uid}): run as the store's owner"
    if uid == st.st_uid:
        return (f"{said}: not even its owner may change it, so it is immutable or append-only: lsattr {path} "
                "shows which (chattr -i or -a, as root, lifts it)")
    return (f"{said}: not even root may change it: it is immutable or append-only (lsattr {path} shows which; "
            f"chattr -i or -a lifts it), or the filesystem does not grant root its rights (NFS root_squash: run "
            f"as its owner, uid {st.st_uid})")


@dataclass
class Walk:
    """Gives what follows the mode its bits (`modes`); counts what it changed."""

    root: Layer
    identities: IdentityRecords
    modes: Permissions
    folders: int = 0
    files: int = 0

    def run(self, open_root: bool = True) -> None:
        """The store's own folder (opened further, with `open_root`), its
        folders and files, then `.lazyfs`, the layout last: the record."""
        if open_root:
            st = os.fstat(self.root.fd)
            self.give(self.root.fd, stat.S_IMODE(st.st_mode) | self.modes.folder, ".", st, PUBLIC)
        self.folder(self.root.fd, "")
        self.metadata(layout=True)

    def give(self, fd: int, mode: int, what: str, st: os.stat_result, ceiling: int) -> None:
        """`fd` (`what`, as `st` shows it) gets exactly `mode`.  `ceiling`: who
        may enter every folder above it (a Look's business)."""
        if stat.S_IMODE(st.st_mode) == mode:
            return
        try:
            os.fchmod(fd, mode)
        except OSError as e:
            raise StoreError(cannot_give(self.root.path, what, mode, e, st), e.errno or errno.EPERM) from None
        if stat.S_ISDIR(st.st_mode):
            self.folders += 1
        else:
            self.files += 1

    def done(self) -> bool:
        """Is there nothing left worth walking to?"""
        return False

    def folder(self, dfd: int, path: str, ceiling: int = PUBLIC) -> bool:
        """Make what lazyfs put in the folder follow the mode; True where the
        folder itself followed it."""
        st = os.fstat(dfd)
        if path:
            ceiling = min(ceiling, reach(st))
        own = foreign = followed = kept = False
        with os.scandir(dfd) as entries:
            names = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)) for e in entries]
        for name, is_dir, is_file in names:
            if self.done():
                break
            if not path and name == RESERVED_NAME:
                continue
            inner = f"{path}{name}"
            if is_dir:
                if self._in(dfd, name, DIR_FLAGS, functools.partial(self.folder, path=inner + "/", ceiling=ceiling)):
                    followed = True
                else:
                    kept = True
            elif is_file and self._in(dfd, name, FILE_FLAGS, functools.partial(self.file, path=inner,
                                                                                ceiling=ceiling)):
                own = True
            else:
                foreign = True  # a file of someone else's, a symlink, a socket: not lazyfs's
        follows = own or followed or not (foreign or kept)
        if follows and path:
            self.give(dfd, self.modes.folder, path.rstrip("/"), st, ceiling)
        return follows

    def file(self, fd: int, path: str, ceiling: int) -> bool:
        """Give a file lazyfs published the mode's read bits; False for any other file."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or self.identities.read(fd, st=st) is None:
            return False
        runs = exec_bits(0o111, self.modes.file) if st.st_mode & 0o100 else 0
        self.give(fd, self.modes.file | runs, path, st, ceiling)
        return True

    def _in(self, dfd: int, name: str, flags: int, then: Callable[[int], bool]) -> bool:
        """`then` of the descriptor of `name`; False where it cannot be opened
        (gone meanwhile, or not ours to open: left as it is)."""
        try:
            fd = os.open(name, flags, dir_fd=dfd)
        except OSError:
            return False
        try:
            return then(fd)
        finally:
            os.close(fd)

    def _given(self, mode: int, what: str, ceiling: int) -> Callable[[int], bool]:
        def give(fd: int) -> bool:
            self.give(fd, mode, what, os.fstat(fd), ceiling)
            return True
        return give

    def metadata(self, layout: bool) -> None:
        """`.lazyfs`, its sidecar records, and last (with `layout`) the layout."""
        meta = self.root.open_dir([RESERVED_NAME])
        try:
            st = os.fstat(meta)
            self.give(meta, self.modes.folder, RESERVED_NAME, st, PUBLIC)
            inside = reach(st)
            try:
                sidecars = self.root.open_dir(SIDECAR_FOLDER)
            except FileNotFoundError:
                sidecars = None
            if sidecars is not None:
                try:
                    st = os.fstat(sidecars)
                    self.give(sidecars, self.modes.folder, _SIDECARS, st, inside)
                    for name in os.listdir(sidecars):
                        record = self._given(self.modes.file, f"{_SIDECARS}/{name}", min(inside, reach(st)))
                        self._in(sidecars, name, FILE_FLAGS, record)
                finally:
                    os.close(sidecars)
            if layout:
                self._in(meta, LAYOUT, FILE_FLAGS, self._given(self.modes.file, f"{RESERVED_NAME}/{LAYOUT}", inside))
        finally:
            os.close(meta)


@dataclass
class Look(Walk):
    """A walk that gives nothing: it finds the widest reach of what a walk
    gives modes to (the layout aside: its mode is the record), and the first
    thing found with it.  It stops once it finds one anyone may reach."""

    widest: int = PRIVATE
    where: str = ""

    def run(self, open_root: bool = False) -> None:
        self.folder(self.root.fd, "")
        if not self.done():
            self.metadata(layout=False)

    def give(self, fd: int, mode: int, what: str, st: os.stat_result, ceiling: int) -> None:
        reaches = min(reach(st), ceiling)
        if reaches > self.widest:
            self.widest, self.where = reaches, what

    def done(self) -> bool:
        return self.widest == PUBLIC
