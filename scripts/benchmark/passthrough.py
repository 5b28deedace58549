"""A minimal read-only pass-through pyfuse3 filesystem over a local folder:
the benchmark's ceiling for any Python FUSE filesystem on this machine.

It does the least a pyfuse3 filesystem can: lookups and attributes from
lstat, directory listings from scandir, reads as a pread on the trio thread
(the data is in the page cache or on a local disk, as lazyfs's warm path
assumes).  It reports the same st_blksize as lazyfs (1 MiB, so `cat` asks for
1 MiB at a time) and uses the same mount options, so the two differ only in
what lazyfs does per request.  With --read-ahead it raises the kernel's
readahead for the mount after INIT, as lazyfs does (its default is 1 MiB).

    python -m benchmark.passthrough SOURCE MOUNTPOINT [--keep-cache] [--read-ahead BYTES]

Runs in the foreground; prints "passthrough: ready" once mounted; SIGTERM or
SIGINT unmounts and exits 0.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Sequence

import pyfuse3
import trio

from lazyfs.mounttab import set_read_ahead

BLKSIZE = 1024 * 1024
TIMEOUT = 300.0


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str, keep_cache: bool) -> None:
        super().__init__()
        self.keep_cache = keep_cache
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self._inodes: dict[str, int] = {source: pyfuse3.ROOT_INODE}
        self._next = pyfuse3.ROOT_INODE + 1
        self.initialized = trio.Event()

    def init(self) -> None:
        self.initialized.set()  # the kernel's INIT has been answered

    def _ino(self, path: str) -> int:
        ino = self._inodes.get(path)
        if ino is None:  # never forgotten: a benchmark mount is short-lived
            ino = self._next
            self._next += 1
            self._inodes[path] = ino
            self._paths[ino] = path
        return ino

    def _path(self, ino: int) -> str:
        try:
            return self._paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, path: str, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        try:
            st = st or os.lstat(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(path)
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns",
                     "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        a.st_mode = (st.st_mode & ~0o222) if stat.S_ISREG(st.st_mode) else st.st_mode
        a.st_blocks = st.st_blocks
        a.st_blksize = BLKSIZE
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        return a

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(os.path.join(self._path(parent_inode), os.fsdecode(name)))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._path(inode))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        base = self._path(fh)
        entries = sorted(os.scandir(base), key=lambda e: e.name)
        for i in range(start_id, len(entries)):
            e = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(e.name), self._attrs(e.path, e.stat(follow_symlinks=False)),
                                         i + 1):
                break

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            fd = os.open(self._path(inode), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.keep_cache, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self._paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, name, getattr(st, name))
        out.f_namemax = 255
        return out


async def _serve(ops: Passthrough, mountpoint: str, read_ahead: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        if read_ahead:
            nursery.start_soon(_tune, ops, mountpoint, read_ahead)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _tune(ops: Passthrough, mountpoint: str, read_ahead: int) -> None:
    # The kernel resets the readahead while it processes the INIT reply.
    await ops.initialized.wait()
    await trio.sleep(0)
    set_read_ahead(Path(mountpoint), read_ahead)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="passthrough", description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("--keep-cache", action="store_true", help="keep the kernel page cache across opens")
    p.add_argument("--read-ahead", type=int, default=0, metavar="BYTES", help="kernel readahead (0: the kernel's)")
    a = p.parse_args(argv)
    ops = Passthrough(os.path.abspath(a.source), a.keep_cache)
    pyfuse3.init(ops, a.mountpoint, {"fsname=passthrough", "subtype=passthrough", "ro", "default_permissions"})
    print("passthrough: ready", flush=True)
    try:
        trio.run(_serve, ops, os.path.abspath(a.mountpoint), a.read_ahead)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
