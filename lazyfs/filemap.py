"""Bytes of a local file served straight from the page cache, within a budget
of mapped pages.

A read-only shared mapping lets a FUSE reply be written to the kernel from the
page cache without a copy into Python, which is what makes the first read of a
cached file faster than pread.  Touched pages count towards the process's RSS,
so a mapping drops its page table entries (MADV_DONTNEED: the page cache
itself stays) every `PageBudget.per_map` bytes it served, and every mapping
that served anything drops them once all of them together served
`PageBudget.total` bytes: hundreds of open files cannot add up.

Reads run on the trio thread only (see docs/concurrency.md), so the budget's
counters need no lock.

Caveat: a file truncated in place under the mapping (nobody should edit the
store while it is mounted) would raise SIGBUS.
"""

from __future__ import annotations

import mmap


class PageBudget:
    """Mapped bytes one process may touch before mappings drop their pages.
    One per process (set from --memory-limit), shared by every FileMap."""

    def __init__(self, total: int = 64 * 1024 * 1024, per_map: int = 8 * 1024 * 1024) -> None:
        self.total = max(4 * 1024 * 1024, total)
        self.per_map = min(per_map, self.total)
        self._recent = 0
        self._dirty: set[FileMap] = set()

    def before_read(self) -> None:
        """Drop every mapping's pages once the budget is spent (before a read,
        so the pages of the reply being built stay mapped until it is sent)."""
        if self._recent >= self.total:
            self._recent = 0
            for dirty in list(self._dirty):
                dirty.drop_pages()

    def served(self, fmap: FileMap, nbytes: int) -> None:
        self._recent += nbytes
        self._dirty.add(fmap)

    def forget(self, fmap: FileMap) -> None:
        self._dirty.discard(fmap)


# The unit in which a mapping knows its pages are in the page cache.
CHUNK = 1024 * 1024


class FileMap:
    """A read-only mapping of `fd`, which its owner keeps open while it lives.

    It also remembers which 1 MiB chunks this process knows to be in the page
    cache (written here, or read in by pagecache.Prefaulter): replying from a
    chunk that is not would fault it in from disk inside the reply, on the
    trio thread (docs/concurrency.md)."""

    def __init__(self, fd: int, size: int, budget: PageBudget, warm: bool = False) -> None:
        self.fd = fd
        self.size = size
        self._mm = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
        self._view = memoryview(self._mm) if self._mm is not None else memoryview(b"")
        self._budget = budget
        self._served = 0
        self._warm = bytearray(b"\x01" if warm else b"\x00") * (-(-size // CHUNK))

    def cold_chunks(self, off: int, size: int) -> range:
        """The chunks [off, off + size) touches that are not known to be cached
        (the whole run between the first and the last such chunk)."""
        first, last = off // CHUNK, min(len(self._warm), -(-(off + size) // CHUNK))
        cold = [i for i in range(first, last) if not self._warm[i]]
        return range(cold[0], cold[-1] + 1) if cold else range(0)

    def is_warm(self, chunk: int) -> bool:
        return 0 <= chunk < len(self._warm) and bool(self._warm[chunk])

    def mark_warm(self, start: int, end: int) -> None:
        """Bytes [start, end) are in the page cache: chunks wholly inside (or
        ending at the end of the file) are warm."""
        first = -(-start // CHUNK)
        last = len(self._warm) if end >= self.size else end // CHUNK
        for i in range(first, last):
            self._warm[i] = 1

    def mark_chunks_warm(self, chunks: range) -> None:
        for i in chunks:
            self._warm[i] = 1

    def read(self, off: int, size: int) -> memoryview:
        if self._served >= self._budget.per_map:
            self.drop_pages()
        self._budget.before_read()
        data = self._view[off:off + size]
        self._served += len(data)
        self._budget.served(self, len(data))
        return data

    def drop_pages(self) -> None:
        self._served = 0
        self._budget.forget(self)
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._budget.forget(self)
        self._view.release()
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a reply still holds a slice: the mapping goes with it
            self._mm = None
