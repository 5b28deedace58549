"""Who may read a store (`--store-mode`), as the store itself records it:
the mode of `.lazyfs/layout`, which lazyfs writes with its files' mode
(0400 private, 0440 group, 0444 public).

A `mount` or `bake` told no `--store-mode` keeps the mode the store has (a new
store is private), so what it adds is reachable by whoever may read the rest.
One told another mode than the store's makes the store follow it (`follow`),
so that no folder it made before keeps the files it makes now from the
readers the new mode names (a bake follows its mode, or the store's, even
where the store says it has it: what an older lazyfs or a hand left mixed is
set right).  The record is changed last: a conversion cut short is done again.

What follows: every folder below the store's own folder that holds a file
lazyfs published there (an identity record), or nothing at all, and those
files (their read bits; an executable copy stays executable by whoever may
read it); `.lazyfs` with its sidecar records; the layout.  A folder holding
only files lazyfs did not put there (an admin's) keeps its mode, as do
`.lazyfs/tmp`, `objects` and `listings` (0700 whatever the mode).  The
store's own folder (`--to`, `--store`, a mountpoint) is only ever opened
further, never narrowed: it may be a folder of the user's.

All functions block: call them before the mount, or from worker threads.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from dataclasses import dataclass
from typing import Callable

from lazyfs.config import DEFAULT_STORE_MODE
from lazyfs.errors import StoreError
from lazyfs.identity import SIDECAR_FOLDER, IdentityRecords
from lazyfs.layer import DIR_FLAGS, FILE_FLAGS, STORE_MODES, Layer, Permissions, exec_bits
from lazyfs.namespace import RESERVED_NAME
from lazyfs.storemeta import LAYOUT
from lazyfs.wording import quoted

log = logging.getLogger(__name__)


def mode_of(bits: int) -> str:
    """The --store-mode whose files have these read bits (the layout's)."""
    return "public" if bits & 0o004 else "group" if bits & 0o040 else "private"


def chosen(asked: str | None, recorded: str | None) -> str:
    """The mode a command gives the store: the one it was told, else the one
    the store records, else a new store's (private)."""
    return asked or recorded or DEFAULT_STORE_MODE


def new_store(asked: str | None) -> Permissions:
    """The modes a store made now gets (it records none yet)."""
    return STORE_MODES[chosen(asked, None)]


def must_follow(asked: str | None, recorded: str, always: bool = False) -> bool:
    """Must a store laid out before (a new one is made with its mode) follow
    the mode chosen?  One of another mode, when told; any, `always` (a bake)."""
    return always or asked not in (None, recorded)


def recorded(root: Layer) -> str | None:
    """The mode the store was last given, None where lazyfs has not laid it
    out (or cannot look: opening it for writing then says why)."""
    try:
        meta = root.open_dir([RESERVED_NAME])
    except OSError:
        return None
    try:
        return mode_of(os.stat(LAYOUT, dir_fd=meta, follow_symlinks=False).st_mode)
    except OSError:
        return None
    finally:
        os.close(meta)


@dataclass
class _Walk:
    root: Layer
    identities: IdentityRecords
    modes: Permissions
    folders: int = 0
    files: int = 0

    def chmod(self, fd: int, mode: int, what: str, st: os.stat_result | None = None) -> None:
        st = st or os.fstat(fd)
        if stat.S_IMODE(st.st_mode) == mode:
            return
        try:
            os.fchmod(fd, mode)
        except OSError as e:
            raise StoreError(f"cannot give {quoted(what)} in store {self.root.path} mode {mode:04o} "
                             f"({e.strerror}): run as the store's owner", e.errno or errno.EPERM) from None
        if stat.S_ISDIR(st.st_mode):
            self.folders += 1
        else:
            self.files += 1

    def folder(self, dfd: int, path: str) -> bool:
        """Make what lazyfs put in the folder follow the mode; True where the
        folder itself followed it."""
        own = foreign = followed = kept = False
        with os.scandir(dfd) as entries:
            names = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)) for e in entries]
        for name, is_dir, is_file in names:
            if not path and name == RESERVED_NAME:
                continue
            inner = f"{path}{name}"
            if is_dir:
                if self._in(dfd, name, DIR_FLAGS, functools.partial(self.folder, path=inner + "/")):
                    followed = True
                else:
                    kept = True
            elif is_file and self._in(dfd, name, FILE_FLAGS, functools.partial(self.file, path=inner)):
                own = True
            else:
                foreign = True  # a file of someone else's, a symlink, a socket: not lazyfs's
        follows = own or followed or not (foreign or kept)
        if follows and path:
            self.chmod(dfd, self.modes.folder, path.rstrip("/"))
        return follows

    def file(self, fd: int, path: str) -> bool:
        """Give a file lazyfs published the mode's read bits; False for any other file."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or self.identities.read(fd, st=st) is None:
            return False
        runs = exec_bits(0o111, self.modes.file) if st.st_mode & 0o100 else 0
        self.chmod(fd, self.modes.file | runs, path, st)
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

    def _give(self, mode: int, what: str) -> Callable[[int], bool]:
        def give(fd: int) -> bool:
            self.chmod(fd, mode, what)
            return True
        return give

    def metadata(self) -> None:
        """`.lazyfs`, its sidecar records, and last the layout: the record."""
        meta = self.root.open_dir([RESERVED_NAME])
        try:
            self.chmod(meta, self.modes.folder, RESERVED_NAME)
            try:
                sidecars = self.root.open_dir(SIDECAR_FOLDER)
            except FileNotFoundError:
                sidecars = None
            if sidecars is not None:
                try:
                    self.chmod(sidecars, self.modes.folder, "/".join(SIDECAR_FOLDER))
                    for name in os.listdir(sidecars):
                        record = self._give(self.modes.file, "/".join((*SIDECAR_FOLDER, name)))
                        self._in(sidecars, name, FILE_FLAGS, record)
                finally:
                    os.close(sidecars)
            self._in(meta, LAYOUT, FILE_FLAGS, self._give(self.modes.file, f"{RESERVED_NAME}/{LAYOUT}"))
        finally:
            os.close(meta)


def follow(root: Layer, identities: IdentityRecords, modes: Permissions, was: str) -> None:
    """Make the store follow `modes` (what `follow` in the module's note
    says), after it had mode `was`: one line says what changed."""
    walk = _Walk(root, identities, modes)
    opened = stat.S_IMODE(os.fstat(root.fd).st_mode) | modes.folder
    walk.chmod(root.fd, opened, ".")
    walk.folder(root.fd, "")
    walk.metadata()
    now = mode_of(modes.file)
    if walk.folders or walk.files or now != was:
        log.info("store %s: %s (it was %s): %d folders and %d files given its modes", root.path,
                 now if now == was else f"now {now}", was, walk.folders, walk.files)
