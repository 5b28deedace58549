"""The FUSE operations: translate kernel requests into catalog, handle and
inode calls, and exceptions into errno.  No caching decisions live here.

Every handler is wrapped by `_translated`: pyfuse3 catches only FUSEError, and
any other exception would end the main loop and leave a dead mount.  Expected
misses (lookup of a missing name) are not logged; every other failure logs one
line with its cause, once (one repeating in a loop: once a minute, repeats.py).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import pyfuse3
import trio

from lazyfs.catalog import Catalog
from lazyfs.errors import LazyfsError, errno_of
from lazyfs.filemodes import LOOK_BATCH, FileModes
from lazyfs.handles import Handles
from lazyfs.inodes import InodeRef, InodeTable, ref_of
from lazyfs.kernelcache import KernelCache
from lazyfs.killwatch import KillWatch
from lazyfs.mounttab import fstype_of_device
from lazyfs.namespace import NAME_MAX, DirNode, RemoteObject
from lazyfs.passthrough import Passthrough
from lazyfs.repeats import RepeatedLines
from lazyfs.statesfile import StatesFile
from lazyfs.stats import STATS
from lazyfs.statusdir import STATUS_DIR, STATUS_NAME, StatusFolder
from lazyfs.storespace import StoreSpace
from lazyfs.xattrs import XATTRS, Readings

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Attributes and names are cached by the kernel this long.  A file inode is one
# immutable object version, and a refresh that changes anything invalidates the
# affected entries explicitly, so the timeout only bounds how long a missed
# invalidation could live.
ATTR_TIMEOUT = 300.0
# Missing names ("does config.json exist?", as loaders probe) are cached
# briefly; objects added by a refresh invalidate their names explicitly.
NEGATIVE_TIMEOUT = 5.0
# Reported block size: tools that size their reads by st_blksize (cat, cp)
# then ask for 1 MiB at a time, the most one FUSE request carries.
BLKSIZE = 1024 * 1024
# A handle reading a file this big as it downloads skips the mount's page cache
# (direct_io): each reply is copied once, into the reader's buffer, instead of
# into newly allocated cache pages and out again, and the bytes are not cached
# twice (the store file's pages hold them).  Smaller files keep the cache:
# parsers read them in small blocks, and each block would be a request.
DIRECT_IO_FROM = 64 * 1024 * 1024
# Whether this pyfuse3 can ask that such a handle may be mapped (the patch in
# scripts/native; only with the kernel's yes is a handle opened so), and hands the kernel's interrupts on.
ASKS_TO_MAP_DIRECT_HANDLES = hasattr(pyfuse3, "direct_io_allows_mmap")
HEARS_INTERRUPTS = bool(getattr(pyfuse3, "INTERRUPTED_HOOK", False))


def _translated(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        self.in_flight += 1
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (LazyfsError, OSError) as e:
            STATS.error(err := errno_of(e, reading=fn.__name__ == "read"))
            if not getattr(e, "logged", False):  # the download that failed has said why already
                self.failure_lines.failed(log, fn.__name__, e, err)  # once a minute for one that repeats
                e.logged = True  # type: ignore[union-attr]
            raise pyfuse3.FUSEError(err) from None
        except Exception:
            STATS.error(errno.EIO)
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.in_flight -= 1

    return wrapper  # type: ignore[return-value]


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, catalog: Catalog, handles: Handles, space: StoreSpace,
                 stats_file: Callable[[], bytes] = lambda: b"{}\n", xattrs: bool = True,
                 passthrough: bool = True, direct_io: bool = True, modes: FileModes | None = None) -> None:
        super().__init__()
        self.modes = modes or FileModes()  # files' permission bits (--file-mode, copies' execute bits)
        # A pyfuse3 built by scripts/native/build-pyfuse3 asks for passthrough at INIT when this
        # attribute is set: backing files may be on one stacked filesystem (overlayfs, a container's root).
        register = getattr(pyfuse3, "passthrough_open", None) if passthrough else None
        if register is not None:
            self.passthrough_backing_stack_depth = 1
        no_backing = lambda backing_id: None  # noqa: E731 (pyfuse3 without passthrough never registers one)
        self.passthrough = Passthrough(register, getattr(pyfuse3, "passthrough_close", no_backing), fstype_of_device)
        # It asks too that a direct_io handle may be mapped (else ENODEV; ASKS_TO_MAP_DIRECT_HANDLES).
        self.direct_io_allow_mmap = direct_io
        self._direct_io = getattr(pyfuse3, "direct_io_allows_mmap", lambda: False) if direct_io else lambda: False
        # False (--no-xattrs): answer ENOSYS once, and the kernel stops asking.
        self.xattrs = xattrs
        self.readings = Readings(handles.fetcher.state_of)  # getfattr -d: every attribute from one look
        self.stats_file = stats_file
        # .lazyfs: the counters, and every file's state for lazyfs status (none without xattrs: no states)
        self.status = StatusFolder(self._stats_snapshot,
                                   StatesFile(catalog, handles.fetcher).snapshot if xattrs else None)
        self.catalog = catalog
        self.handles = handles
        handles.passes_through = lambda: self.passthrough.enabled
        self.space = space  # the store filesystem's size, for statfs
        self.inodes = InodeTable(catalog.presents)
        self._dirs: dict[int, tuple[int, DirNode]] = {}  # fh -> the folder's inode, its snapshot
        self._next_dir = 1
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started_ns = time.time_ns()  # the date of folders known before any listing
        self.initialized = trio.Event()  # set once the kernel's INIT is answered
        self.kernel = KernelCache(self.inodes)  # what the kernel should forget
        self.failure_lines = RepeatedLines()  # a failure repeating in a loop logs a line a minute (repeats.py)
        self.in_flight = 0  # requests being handled (an aborted connection abandons them: connwatch.py)
        self.kills = KillWatch()  # a killed task's request ends at once (killwatch.py), with a pyfuse3 that hears it
        if HEARS_INTERRUPTS:
            self.interrupted = self.kills.interrupted

    def init(self) -> None:
        if self.direct_io_allow_mmap and not self._direct_io():  # asked for, and not granted
            log.info("files still downloading are read through the page cache: skipping it needs Linux 6.6+ "
                     "and the pyfuse3 scripts/native/build-pyfuse3 builds")
        self.initialized.set()

    # -- attributes ------------------------------------------------------------

    def _attrs(self, ino: int, ref: InodeRef | DirNode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = ATTR_TIMEOUT
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_blksize = BLKSIZE
        if isinstance(ref, tuple) and ref != STATUS_DIR:  # a file of .lazyfs
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = self.status.size(ref)  # of the snapshot an open reads (statusdir.py)
            a.attr_timeout = a.entry_timeout = 0  # changes all the time
            mtime = time.time_ns()
        elif isinstance(ref, RemoteObject):
            a.st_mode = stat.S_IFREG | self.modes.shown(ref)
            a.st_nlink = 1
            a.st_size = ref.size
            a.st_blocks = -(-ref.size // 512)
            mtime = ref.mtime_ns
        else:
            node = ref if isinstance(ref, DirNode) else None
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2 + (node.nsubdirs if node else 0)
            a.st_size = 0
            a.st_blocks = 0
            mtime = node.mtime_ns if node else self.started_ns
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        return a

    async def _stats_snapshot(self) -> bytes:
        await self.space.current()  # the snapshot reports its last answer
        return self.stats_file()

    def _dir_path(self, ino: int) -> str:
        ref = self.inodes.get(ino)
        if ref is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not isinstance(ref, str):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ref

    async def _dir(self, ino: int) -> DirNode:
        if self.inodes.get(ino) == STATUS_DIR:
            return self.status.node(time.time_ns())
        node = await self.catalog.folder(self._dir_path(ino))
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)  # removed by a refresh
        return node

    # -- names -------------------------------------------------------------------

    @_translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if len(name) > NAME_MAX:  # (the kernel leaves it to the filesystem, as statfs's f_namemax says)
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        child = await self._child(parent_inode, os.fsdecode(name))
        if child is None:
            miss = pyfuse3.EntryAttributes()
            miss.st_ino = 0  # a negative entry the kernel may cache
            miss.entry_timeout = NEGATIVE_TIMEOUT
            return miss
        if isinstance(child, tuple) and child != STATUS_DIR:
            await self.status.take(child)  # what the open after it reads, and so its size
        await self.modes.learn((child,))
        ino = self.inodes.lookup(ref_of(child))
        return self._attrs(ino, child)

    async def _child(self, parent_inode: int, name: str) -> DirNode | RemoteObject | tuple[str, ...] | None:
        ref = self.inodes.get(parent_inode)
        if ref == STATUS_DIR:
            return self.status.child(name)
        if ref == "" and name == STATUS_NAME:
            return STATUS_DIR
        return await self.catalog.lookup(self._dir_path(parent_inode), name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            if self.inodes.forget(ino, n):
                self.handles.release_inode(ino)
                self.passthrough.release_inode(ino)

    @_translated
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ref = self.inodes.get(inode)
        if ref is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if isinstance(ref, str):
            node = self.catalog.tree.find(ref) if self.catalog.listed.is_set() else None
            return self._attrs(inode, node if isinstance(node, DirNode) else ref)
        if ref == STATUS_DIR:
            return self._attrs(inode, DirNode(STATUS_NAME, {}, time.time_ns()))
        if isinstance(ref, tuple):  # a file of .lazyfs: the size of what an open reads now (an fstat: its own)
            await self.status.take(ref, again=False)
        await self.modes.learn((ref,), again=True)  # asked before the kernel refuses to run a file
        return self._attrs(inode, ref)

    # -- directories ----------------------------------------------------------------

    @_translated
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = await self._dir(inode)
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = inode, node  # pinned: offsets stay valid across a refresh
        return fh

    @_translated
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh not in self._dirs:
            raise pyfuse3.FUSEError(errno.EBADF)
        ino, node = self._dirs[fh]
        # ".", ".." (the root's is the root), then the names: entry i's offset is i + 1.
        # The kernel takes only the dots' inode and type, and counts no lookup for them.
        parent = self.inodes.ino(node.path.rpartition("/")[0])
        for i, (name, dot) in enumerate(((b".", ino), (b"..", parent))):
            if i >= start_id and not pyfuse3.readdir_reply(token, name, self._attrs(dot, node), i + 1):
                return
        first = max(start_id, 2) - 2
        await self.modes.learn(node.children[name] for name in node.names[first:first + LOOK_BATCH])
        for i in range(first, len(node.names)):
            child = node.children[node.names[i]]
            ino = self.inodes.lookup(ref_of(child))
            if not pyfuse3.readdir_reply(token, os.fsencode(node.names[i]), self._attrs(ino, child), i + 3):
                self.inodes.forget(ino, 1)  # not sent: not counted
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files -------------------------------------------------------------------------

    @_translated
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):  # (O_APPEND alone asks no write: it reads)
            raise pyfuse3.FUSEError(errno.EROFS)
        ref = self.inodes.get(inode)
        if ref is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if isinstance(ref, tuple) and ref != STATUS_DIR:  # one consistent snapshot per open
            return pyfuse3.FileInfo(fh=await self.status.open(ref), direct_io=True, keep_cache=False)
        if not isinstance(ref, RemoteObject):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not self.catalog.presents(ref):
            # The kernel's cached name still points at an older version: ESTALE
            # makes it look the name up again and open the current one.
            raise pyfuse3.FUSEError(errno.ESTALE)
        fh = await self.handles.open(ref, inode, direct=bool(flags & os.O_DIRECT))
        backing_id = self.passthrough.open(fh, inode, self.handles.local_copy(fh))
        if backing_id:  # the kernel reads the local copy itself (passthrough.py)
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False, backing_id=backing_id)
        # keep_cache: this inode is one immutable version, so pages the kernel cached for it stay right
        # across opens (a new version is a new inode), unless they came from a local copy refused since.
        direct_io = ref.size >= DIRECT_IO_FROM and self.handles.reads_arriving(fh) and self._direct_io()
        STATS.opens_direct_io += direct_io
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.handles.keeps_cache(fh), direct_io=direct_io)

    @_translated
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        # pyfuse3 replies with any buffer: a view of the mapping saves a copy.
        virtual = self.status.read(fh, off, size)
        return virtual if virtual is not None else await self.handles.read(fh, off, size)

    async def release(self, fh: int) -> None:
        if self.status.release(fh):
            return
        self.passthrough.release(fh)
        try:
            self.handles.release(fh)
        except OSError as e:
            log.warning("closing handle %d: %s", fh, e)

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    # -- the rest ---------------------------------------------------------------------------

    @_translated
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self.space.current()
        out = pyfuse3.StatvfsData()
        # Blocks and inodes: the store's filesystem's, whose free inodes are
        # what bounds the files lazyfs can still fetch (Mountpoint and gcsfuse,
        # which keep nothing on disk, report a huge count, all free).  Not the
        # listing's file count, all used: `df -i` showed 100% on every mount.
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, name, getattr(st, name))
        out.f_namemax = NAME_MAX
        return out

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        # `ls -l` asks for security.selinux and system.posix_acl_access on every file.  Only user.*
        # attributes exist here, so other namespaces are not supported (ENOTSUP) rather than absent
        # (ENODATA): ls then stops asking for the rest of the mount, where ENODATA cost a round trip per file.
        if name not in XATTRS:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR if name.startswith(b"user.") else errno.EOPNOTSUPP)
        return await self._lazyfs_xattr(inode, name)

    @_translated
    async def _lazyfs_xattr(self, inode: int, name: bytes) -> bytes:
        ref = self.inodes.get(inode)
        if not isinstance(ref, RemoteObject):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if name == b"user.lazyfs.source":
            return ref.uri.encode()
        if name == b"user.lazyfs.etag":
            return ref.etag.encode()
        local = await self.readings.state(inode, ref)
        if name == b"user.lazyfs.fetched_bytes":
            return str(local.bytes).encode()
        if name == b"user.lazyfs.verified":
            return local.verified.encode()
        return local.state.value.encode()

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        ref = self.inodes.get(inode)
        if isinstance(ref, RemoteObject):
            self.readings.listed(inode, ref)
        return list(XATTRS) if isinstance(ref, RemoteObject) else []

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.EINVAL)

    # Read-only: every mutation fails with EROFS (the mount is also "ro", so
    # the kernel refuses most of them before they get here).
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)
