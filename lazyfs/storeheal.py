"""The store's folders removed under a running mount, and made whole again.

An operator's `rm -rf STORE/.lazyfs/tmp`, `rm -rf STORE/.lazyfs`, `rm -rf
STORE/*` or `rm -rf STORE` (then maybe `mkdir STORE`) while mounted: the store
holds descriptors of its folder and of `.lazyfs`, `tmp/` and `objects/`, and
a descriptor of a removed folder still works, but nothing can be made in it
any more (ENOENT).  Before this every open of a file not on disk failed with
ENOENT ("cannot lock the download in the store") until a restart: what a
model loader takes for "this optional file is absent".

`Healer.check` runs before a download starts (probe.probe_store) and before
a publish (Store.publish): one fstat per held folder (st_nlink == 0: removed,
as stalefolder.py and Store._place tell a removed model folder).  Then:

- the store's own folder removed: if its path names a folder again (the
  operator made it again, or a new volume is mounted there, or a symlink
  to a folder: followed, as at start), the store moves to it (not onto a
  read-only filesystem, which start refuses too: EIO saying so), and
  whether its filesystem keeps user xattrs (identity.py) is asked again,
  as at start; if nothing is there, StoreError (EIO) says the store's folder
  was removed, and files not on disk cannot be fetched until it is there again
  (files on disk elsewhere, prebaked layers, and handles already open go on
  serving);
- `.lazyfs`, `tmp/` or `objects/` removed (or the store moved): they are
  made again as at start (storemeta.open_to_write), and every part of the
  store that holds one of them is given the new descriptor.

A descriptor replaced is never closed before the store is (a thread may be
using it this very moment): it goes to the store's kept descriptors, a few
more for each removal.  Downloads running when their folder went keep their
files (open descriptors) and serve their readers; their publish finds the
file gone and keeps nothing (Store.publish), so the next open fetches again.

Blocking (a few fstat; more only when something was removed): call it from a
worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

from lazyfs import storemeta
from lazyfs.content_index import ContentIndex
from lazyfs.errors import StoreError
from lazyfs.identity import IdentityRecords
from lazyfs.layer import Layer, Permissions, removed
from lazyfs.namespace import RESERVED_NAME
from lazyfs.partials import PartialFiles
from lazyfs.storemeta import Keep

log = logging.getLogger(__name__)


class Healer:
    """One store's held folders, looked at and made again when removed."""

    def __init__(self, root: Layer, permissions: Permissions, keep: Keep, meta_fd: int, partials: PartialFiles,
                 index: ContentIndex, identities: IdentityRecords) -> None:
        self.root = root
        self.permissions = permissions
        self.keep = keep
        self.meta_fd = meta_fd
        self.partials = partials
        self.index = index
        self.identities = identities
        self._lock = threading.Lock()  # one thread heals; the others wait, then find it whole

    def _broken(self) -> bool:
        return any(removed(fd) for fd in (self.root.fd, self.meta_fd, self.partials.tmp_fd, self.index.fd))

    def check(self) -> None:
        """Make the store whole again if any of its folders was removed
        (StoreError, EIO: the store's own folder is gone, nothing at its path)."""
        if not self._broken():
            return
        with self._lock:
            if self._broken():
                self._heal()

    def _heal(self) -> None:
        path = self.root.path
        moved = removed(self.root.fd)
        if moved:
            self._move_root()
            what = f"the store's folder {path}"
        elif removed(self.meta_fd):
            what = f"{path}/{RESERVED_NAME}"
        else:
            what = f"{path}/{RESERVED_NAME}/{'tmp' if removed(self.partials.tmp_fd) else 'objects'}"
        try:
            meta_fd, tmp_fd, objects_fd = storemeta.open_to_write(self.root, self.permissions, self.keep)
        except StoreError as e:
            raise StoreError(f"{what} was removed under the mount, and the store cannot be made whole again: {e}",
                             errno.EIO) from None
        self.meta_fd, self.partials.tmp_fd, self.index.fd = meta_fd, tmp_fd, objects_fd
        if moved:  # maybe another filesystem: whether it keeps xattrs asked again, as at start
            self.identities.moved(tmp_fd, self.keep)
        else:
            self.identities.reopen(self.keep)
        log.warning("store: %s was removed under the mount; %s", what, f"using the folder there now{leads_to(path)} "
                    "(files not in it are fetched again when opened)" if moved else "made again")

    def _move_root(self) -> None:
        """To the folder the store's path names now, if it names one: through a
        symlink at the path too, as at start (`mount.open_store`: a symlinked
        store path is a common deployment); never onto a read-only filesystem,
        which start refuses as well (EROFS): the mount's own, through a symlink
        into it, would have its reads of the store ask the mount itself."""
        path = self.root.path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            now = "nothing is there now" if e.errno == errno.ENOENT else f"{e.strerror or e}, now"
            raise StoreError(f"the store's folder {path} was removed under the mount ({now}{leads_to(path)}): files "
                             f"not on disk cannot be fetched until the folder is there again", errno.EIO) from None
        if read_only(fd):
            os.close(fd)
            raise StoreError(f"the store's folder {path} was removed under the mount, and the folder there now"
                             f"{leads_to(path)} is on a read-only filesystem: files not on disk cannot be fetched "
                             f"until a writable folder is there again", errno.EIO)
        self.keep(self.root.fd)  # (closed with the store: a thread may be using it)
        self.root.fd = fd


def read_only(fd: int) -> bool:
    try:
        return bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY)
    except OSError:
        return False  # (the store's folders made there say what is wrong)


def leads_to(path: str) -> str:
    """Where a symlink at the store's path leads, for its lines; "" for none."""
    return f" (a symlink to {os.path.realpath(path)})" if os.path.islink(path) else ""
