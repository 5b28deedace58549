"""FUSE passthrough: the kernel reads a complete local copy without asking lazyfs.

With Linux >= 6.9 and a pyfuse3 that exposes it (scripts/native/build-pyfuse3),
an open of a file whose local copy is complete (in the store, or prebaked)
hands the kernel that file's descriptor (a *backing id*).  Reads, page faults
and readahead of the handle then go to the store file as if it were opened
directly: no FUSE request per readahead window, no copy into the mount's page
cache, the store disk's own readahead.  A file still downloading is served
through lazyfs as before (its bytes are not all there), and so is a copy on a
network or FUSE filesystem, where lazyfs's read deadline and a stop must still
be able to release a reader the store keeps waiting.

The kernel's rules this module keeps (fs/fuse/iomode.c):
- an inode is open either through the mount's page cache or in passthrough,
  never both at once: the other kind of open fails (the opener gets EIO).  An inode with a
  cached handle open gets cached handles until all are closed (a reader that
  opened it while it downloaded keeps it that way), and one with passthrough
  handles gets passthrough;
- a handle opened direct_io (a big file read as it downloads: fuse_ops)
  counts as a cached one here: mapping it puts the inode in the kernel's
  cached mode until it is closed;
- all passthrough handles of an inode share one backing id (another gives
  EBUSY): the first registers its file, the last release unregisters it.  An
  inode is one immutable version, so any copy of it has the same bytes;
- a passthrough open must not ask to keep the page cache (the kernel fails it).

Runs on the trio thread only (the FUSE handlers), so it never touches the
copy's filesystem (a hung NFS server would stall the mount): the copy's
st_dev comes from the store thread that judged it, the filesystem's type from
/proc/self/mountinfo, and the two calls into the kernel are ioctls on
/dev/fuse that do not block.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable

from lazyfs.mounttab import device_name
from lazyfs.stats import STATS

log = logging.getLogger(__name__)

# Filesystems whose reads can hang or fail in ways a reader must be released
# from (lazyfs's --read-deadline, a stop): their copies are served by lazyfs.
REMOTE_FSTYPES = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre",
                            "afs", "ncpfs", "fuse", "fuseblk", "virtiofs"})

# The kernel refuses every backing file for these: the mount did not get
# passthrough (old kernel, the INIT flag not granted) or lacks CAP_SYS_ADMIN.
_NEVER = (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS)


def kernel_passes_through(release: str | None = None) -> bool:
    """Is this kernel new enough for FUSE passthrough (Linux 6.9)?"""
    return kernel_at_least((6, 9), release)


def kernel_at_least(version: tuple[int, int], release: str | None = None) -> bool:
    """Is this kernel (or `release`, as uname says it) `version` or newer?"""
    found = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return found is not None and (int(found[1]), int(found[2])) >= version


def is_remote_fstype(fstype: str | None) -> bool:
    return fstype is not None and (fstype in REMOTE_FSTYPES or fstype.startswith("fuse."))


@dataclass(slots=True)
class _Inode:
    backing_id: int  # 0: its handles read through the mount's page cache
    handles: int


class Passthrough:
    """Which handles the kernel serves from their local copy, and the backing ids.

    `register(fd) -> id` and `unregister(id)` are the kernel's (pyfuse3's
    passthrough_open/close); `fstype_of(st_dev)` names the filesystem a copy
    is on (None when unknown).  `register=None`: passthrough is unavailable,
    and every open is a cached one."""

    def __init__(self, register: Callable[[int], int] | None, unregister: Callable[[int], None],
                 fstype_of: Callable[[int], str | None]) -> None:
        self._register = register
        self._unregister = unregister
        self._fstype_of = fstype_of
        self._inodes: dict[int, _Inode] = {}
        self._handles: dict[int, int] = {}  # fh -> inode
        self._local: dict[int, bool] = {}  # st_dev -> may be passed through

    @property
    def enabled(self) -> bool:
        return self._register is not None

    def open(self, fh: int, inode: int, copy: tuple[int, int] | None) -> int:
        """The backing id for handle `fh` of `inode` (0: serve it through
        lazyfs).  `copy` is its complete local copy's descriptor and st_dev,
        None while it downloads."""
        state = self._inodes.get(inode)
        if state is None:
            state = self._inodes[inode] = _Inode(0, 0)
            if copy is not None:
                state.backing_id = self._backing(*copy)
        state.handles += 1
        self._handles[fh] = inode
        if state.backing_id:
            STATS.opens_passthrough += 1
        return state.backing_id

    def release(self, fh: int) -> None:
        inode = self._handles.pop(fh, None)
        if inode is None:
            return
        state = self._inodes[inode]
        state.handles -= 1
        if state.handles > 0:
            return
        del self._inodes[inode]
        if state.backing_id:
            try:
                self._unregister(state.backing_id)
            except OSError as e:
                log.warning("passthrough: releasing backing file %d: %s", state.backing_id, e)

    def release_inode(self, inode: int) -> None:
        """The kernel forgot `inode`: handles still counted for it never
        reached it (Handles.release_inode)."""
        for fh in [fh for fh, ino in self._handles.items() if ino == inode]:
            self.release(fh)

    def _backing(self, fd: int, dev: int) -> int:
        if self._register is None:
            return 0
        try:
            local = self._local.get(dev)
            if local is None:
                fstype = self._fstype_of(dev)
                local = self._local[dev] = not is_remote_fstype(fstype)
                if not local:
                    log.info("passthrough: copies on %s (a %s filesystem) are served through lazyfs",
                             device_name(dev), fstype)
            return self._register(fd) if local else 0
        except OSError as e:
            if e.errno in _NEVER:
                log.warning("passthrough unavailable (%s): lazyfs serves every read itself", os.strerror(e.errno))
                self._register = None
            else:  # a property of the copy's filesystem (ELOOP: stacked too deep)
                self._local[dev] = False
                log.warning("passthrough: the kernel refused a copy on %s (%s); copies there are served "
                            "through lazyfs", device_name(dev), os.strerror(e.errno or errno.EIO))
            return 0
