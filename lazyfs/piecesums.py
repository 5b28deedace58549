"""CRCs of a download's pieces, taken as they are written, combined into the
object's checksum: verification without reading the file back.

A CRC of bytes A then B follows from CRC(A), CRC(B) and len(B) (awscrt's
`combine_*`), so a file checked against a CRC32, CRC32C or CRC64NVME (of the
full object, or composite: one per part) needs no pass over its bytes once
they are in.  Each piece is summed by the network thread that writes it
(CRC32C and CRC64NVME at about 9 GB/s here, against the ~1 GB/s a piece
arrives at), and at the end the sums are combined in file order, part by
part.  What no sum covers is read back from the file and summed then:
pieces written before the algorithm was known (the first round trip, when
only a HEAD can name it), blocks a resumed download found on disk, and a
part boundary that is not a multiple of a MiB.  Reading the file back cost
the daemon a copy out of the page cache (or the disk, after a direct write)
per byte, about a third of its CPU on a cold load (docs/bench-after.md).

Real S3 keeps a CRC64NVME of every object uploaded since December 2024 and
names its algorithm in listings, so this is the common case there.  MD5s
(single-part and multipart ETags) cannot be combined: those files are still
hashed from the file as it fills (alongside.hash_along).

What a sum vouches for: the bytes received are the object's, and each
piece's `pwrite` took all of them at their offset.  When the combined value
does not match, nothing is refused on its word: the file is hashed from the
disk (completion.check), which decides.

Sums are kept per cell of `CELL` bytes (a segment never crosses a cell's
end), so a part boundary at any multiple of a MiB, where every common
uploader puts them, falls between two sums.  A cell summed whole is one
8-byte entry in an array (a 100 GiB file: 800 KiB), not a Python object.

Thread-safety: `summed` runs in any thread without a lock (it only reads
its arguments); `record` must run under the download's write lock, right
after the piece's write, so that the sums kept are of the last bytes written
to each range.  `start` and `hashed` take the sums' own lock.
"""

from __future__ import annotations

import array
import base64
import threading
from dataclasses import dataclass
from typing import Callable

from lazyfs import readback, verify
from lazyfs.verify import COMPOSITE_SUFFIX, Expectation, Hashed

CELL = 1024 * 1024

# algorithm -> (awscrt's sum, its combine, bytes of the value)
_NAMES = {"CRC32": ("crc32", "combine_crc32", 4),
          "CRC32C": ("crc32c", "combine_crc32c", 4),
          "CRC64NVME": ("crc64nvme", "combine_crc64nvme", 8)}


@dataclass(frozen=True, slots=True)
class _Crc:
    algorithm: str
    of: Callable[..., int]  # (data, previous=0) -> crc
    combine: Callable[[int, int, int], int]  # (crc of A, crc of B, len(B)) -> crc of A then B
    width: int


def _crc(algorithm: str) -> _Crc | None:
    names = _NAMES.get(algorithm)
    if names is None:
        return None
    try:
        from awscrt import checksums  # a dependency; its `combine_*` came in 2026 (without: no sums)
    except ImportError:
        return None
    of, combine = getattr(checksums, names[0], None), getattr(checksums, names[1], None)
    return _Crc(algorithm, of, combine, names[2]) if of and combine else None


def algorithm_of(exp: Expectation) -> str:
    """The CRC a checksum expectation is made of ("CRC32C" for a composite
    CRC32C), or "" for anything else (MD5s, SHAs)."""
    base = exp.algorithm.removesuffix(COMPOSITE_SUFFIX)
    return base if base in _NAMES and exp.algorithm != "MD5-multipart" else ""


# A piece's sums, cell by cell: (offset, length, crc) for each, and the CRC they were made with.
Summed = tuple[_Crc, list[tuple[int, int, int]]]


class PieceSums:
    """The sums of one download's pieces (one `Partial`: a new one starts
    afresh).  Nothing is summed until `start` names an algorithm."""

    def __init__(self, size: int, algorithm: str = "") -> None:
        self.size = size
        self._lock = threading.Lock()
        self._crc: _Crc | None = None
        ncells = -(-size // CELL)
        self._whole = bytearray(ncells)  # 1: the cell's sum is in _cell_crc
        self._cell_crc = array.array("Q", bytes(8 * ncells))
        # Cells summed in part: [start, length, crc] segments, disjoint.
        self._parts: dict[int, list[list[int]]] = {}
        self.start(algorithm)

    def start(self, algorithm: str) -> bool:
        """Sum pieces with `algorithm` ("" for none) from now on; sums made
        with another are forgotten.  Whether it can (awscrt combines it)."""
        crc = _crc(algorithm)
        with self._lock:
            if self._crc is None or crc is None or crc.algorithm != self._crc.algorithm:
                self._crc = crc
                self._whole[:] = bytes(len(self._whole))
                self._parts.clear()
        return crc is not None

    @property
    def algorithm(self) -> str:
        crc = self._crc
        return crc.algorithm if crc else ""

    def summed(self, offset: int, data: bytes | memoryview) -> Summed | None:
        """The sums of a piece about to be written at `offset` (None: nothing
        is being summed).  The CPU-bound part, outside any lock."""
        crc = self._crc
        if crc is None:
            return None
        view, sums = memoryview(data), []
        while view:
            take = min(len(view), CELL - offset % CELL)
            sums.append((offset, take, crc.of(view[:take])))
            view, offset = view[take:], offset + take
        return crc, sums

    def record(self, piece: Summed | None) -> None:
        """Keep a piece's sums once it is written (under the write lock)."""
        if piece is None:
            return
        crc, sums = piece
        with self._lock:
            if crc is not self._crc:
                return  # summed with an algorithm given up meanwhile
            for offset, length, value in sums:
                self._keep(crc, offset, length, value)

    def _keep(self, crc: _Crc, offset: int, length: int, value: int) -> None:
        cell = offset // CELL
        segments = self._parts.get(cell)
        if segments is None:
            segments = []
            if self._whole[cell]:  # rewritten: the whole cell's sum becomes a segment
                self._whole[cell] = 0
                segments.append([cell * CELL, self._cell_length(cell), self._cell_crc[cell]])
            self._parts[cell] = segments
        end = offset + length
        grown = next((s for s in segments if s[0] + s[1] == offset), None)
        # A range written again: the sums of its earlier bytes no longer say what is on disk.
        segments[:] = [s for s in segments if s is grown or s[0] + s[1] <= offset or s[0] >= end]
        if grown is not None:
            grown[1] += length
            grown[2] = crc.combine(grown[2], value, length)
        else:
            grown = [offset, length, value]
            segments.append(grown)
        if grown[0] == cell * CELL and grown[1] == self._cell_length(cell):
            self._whole[cell] = 1
            self._cell_crc[cell] = grown[2]
            del self._parts[cell]

    def _cell_length(self, cell: int) -> int:
        return min(CELL, self.size - cell * CELL)

    def hashed(self, fd: int, exp: Expectation, cancelled: Callable[[], bool] = lambda: False) -> Hashed | None:
        """What the file's bytes hash to in `exp`'s form: the sums combined,
        and what they do not cover read back from `fd` (blocking).  None when
        the pieces were not summed with exp's CRC."""
        with self._lock:
            crc = self._crc
            if crc is None or algorithm_of(exp) != crc.algorithm:
                return None
            whole, cell_crc = bytes(self._whole), self._cell_crc[:]
            parts = {cell: sorted((s[0], s[1], s[2]) for s in segs) for cell, segs in self._parts.items()}
        bounds = exp.part_sizes if exp.per_part else (self.size,)
        if sum(bounds) != self.size:
            return None
        part_values, start = [], 0
        for length in bounds:
            part_values.append(_combined(crc, fd, self.size, start, start + length, whole, cell_crc, parts,
                                         cancelled))
            start += length
        return Hashed(exp, self.size, _value(crc, exp, part_values))


def _combined(crc: _Crc, fd: int, size: int, start: int, end: int, whole: bytes, cell_crc: array.array[int],
              parts: dict[int, list[tuple[int, int, int]]], cancelled: Callable[[], bool]) -> int:
    """The CRC of bytes [start, end): sums where they fit, the rest read back."""
    total = _Total(crc)
    pos, gap_from = start, -1  # gap_from: where bytes no sum covers began (read back in one go)
    while pos < end:
        cell = pos // CELL
        found = _sum_at(pos, end, size, whole[cell], cell_crc[cell], parts.get(cell, ()))
        if found is None:
            if gap_from < 0:
                gap_from = pos
            later = [s_start for s_start, _, _ in parts.get(cell, ()) if s_start > pos]
            pos = min([(cell + 1) * CELL, end, *later])
            continue
        if gap_from >= 0:
            total.add(_read_back(crc, fd, gap_from, pos, cancelled), pos - gap_from)
            gap_from = -1
        length, value = found
        total.add(value, length)
        pos += length
    if gap_from >= 0:
        total.add(_read_back(crc, fd, gap_from, end, cancelled), end - gap_from)
    return total.value


def _sum_at(pos: int, end: int, size: int, whole: int, cell_crc: int,
            segments: list[tuple[int, int, int]] | tuple[()]) -> tuple[int, int] | None:
    """(length, crc) of a sum of bytes from `pos` that ends by `end`, if one was kept."""
    cell_start = pos - pos % CELL
    if whole:
        length = min(CELL, size - cell_start)
        return (length, cell_crc) if pos == cell_start and cell_start + length <= end else None
    for s_start, s_len, s_crc in segments:
        if s_start == pos and pos + s_len <= end:
            return s_len, s_crc
    return None


class _Total:
    """A CRC of consecutive ranges, added in order."""

    def __init__(self, crc: _Crc) -> None:
        self._crc, self.value, self._empty = crc, 0, True

    def add(self, value: int, length: int) -> None:
        self.value = value if self._empty else self._crc.combine(self.value, value, length)
        self._empty = False


def _read_back(crc: _Crc, fd: int, start: int, end: int, cancelled: Callable[[], bool]) -> int:
    h = verify.CrcHasher(crc.of, crc.width)
    readback.read_into(fd, start, end, h, cancelled)
    return h.value


def _value(crc: _Crc, exp: Expectation, part_values: list[int]) -> str:
    digests = [v.to_bytes(crc.width, "big") for v in part_values]
    if not exp.per_part:
        return base64.b64encode(digests[0]).decode()
    return verify.composite_value(exp, digests)
