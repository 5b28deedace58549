"""Open files and the read path.

A handle reads either a current local copy (a descriptor of its own) or a
download (the download's descriptor, waiting for the bytes it covers first).
Reads of bytes already on disk are plain preads on the trio thread: they hit
the page cache or a local disk, and a thread hop would cost more than the
read itself (it would cap the warm path well below the disk's speed).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from lazyfs.errors import LazyfsError
from lazyfs.fetch import Download, Fetcher
from lazyfs.namespace import RemoteObject
from lazyfs.store import LocalCopy


class BadHandle(LazyfsError):
    errno = errno.EBADF


@dataclass(slots=True)
class OpenFile:
    obj: RemoteObject
    fd: int  # -1 while reading through a download
    download: Download | None
    # Where the bytes come from: "cached", "prebaked" or "s3" (a download).
    source: str


@dataclass
class ServedBytes:
    """Bytes returned to readers, by where they came from."""

    by_source: dict[str, int] = field(default_factory=lambda: {"cached": 0, "prebaked": 0, "s3": 0})
    hits: int = 0
    misses: int = 0


class Handles:
    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self._open: dict[int, OpenFile] = {}
        self._next = 1
        self.served = ServedBytes()

    def __len__(self) -> int:
        return len(self._open)

    def is_open(self, obj: RemoteObject) -> bool:
        return any(of.obj == obj for of in self._open.values())

    async def open(self, obj: RemoteObject) -> int:
        got = await self.fetcher.acquire(obj)
        if isinstance(got, LocalCopy):
            of = OpenFile(obj, got.fd, None, got.state)
            self.served.hits += 1
        else:
            got.add_reader()
            of = OpenFile(obj, -1, got, "s3")
            self.served.misses += 1
        fh = self._next
        self._next += 1
        self._open[fh] = of
        return fh

    async def read(self, fh: int, off: int, size: int) -> bytes:
        of = self._open.get(fh)
        if of is None:
            raise BadHandle(f"read on unknown file handle {fh}")
        dl = of.download
        if dl is None:
            data = os.pread(of.fd, size, off)
        else:
            if not dl.complete:
                await dl.wait_range(off, off + size)
            data = os.pread(dl.fd, size, off)
        self.served.by_source[of.source] += len(data)
        return data

    def release(self, fh: int) -> None:
        of = self._open.pop(fh, None)
        if of is None:
            return
        if of.download is not None:
            of.download.drop_reader()
        else:
            os.close(of.fd)

    def close_all(self) -> None:
        for fh in list(self._open):
            self.release(fh)
