"""The resume record of a download (`.lazyfs/tmp/<id>.json`, see partials.py):
which blocks of the sparse file are durably on disk, for exactly one object
version and one sparse file (by inode).

Format 2 lists the blocks as runs `[first, end)`: a download in order is one
run whatever its size.  Format 1, a list of block numbers, passed the 16 MiB
read limit at 2 TiB (two million 1 MiB blocks), so such a download started
again from nothing; it is still read.  Pure: no I/O here.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from typing import Any, Iterable

from lazyfs.namespace import RemoteObject

RECORD_MAX = 1 << 24  # bytes read of a record
# Runs a record keeps: about 21 bytes each, so 500,000 stay well inside the
# read limit.  Only a download scattered block by block has more; then the
# shortest runs are left out of the record (re-fetched after a restart).
MAX_RUNS = 500_000


def nblocks(size: int, block_size: int) -> int:
    return max(1, -(-size // block_size))


def runs_of(blocks: Iterable[int], limit: int = MAX_RUNS) -> list[list[int]]:
    """Block numbers as sorted runs [first, end).  Past `limit` runs the
    shortest are left out: a record may under-report what is on disk (those
    blocks are fetched again), never over-report."""
    runs: list[list[int]] = []
    for b in sorted(blocks):
        if runs and runs[-1][1] == b:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    if len(runs) > limit:
        runs = sorted(heapq.nlargest(limit, runs, key=lambda r: r[1] - r[0]))
    return runs


@dataclass(frozen=True, slots=True)
class Record:
    """A resume record, checked against the version it must describe."""

    ino: int  # of the sparse file it was written for
    block_size: int
    runs: tuple[tuple[int, int], ...]  # [first, end), within the object's blocks

    def blocks(self) -> frozenset[int]:
        return frozenset(b for first, end in self.runs for b in range(first, end))

    def nbytes(self, size: int) -> int:
        return sum(min(size, end * self.block_size) - first * self.block_size for first, end in self.runs)


def parse_record(state: dict[str, Any], obj: RemoteObject) -> Record | None:
    """The record in `state` if it is about exactly this version (either format)."""
    size = int(state.get("block_size") or state.get("part_size") or 0)  # "part_size": older records
    if state.get("v") not in (1, 2) or size <= 0 or \
            (state.get("bucket"), state.get("key"), state.get("etag"), state.get("size")) != obj.version:
        return None
    n = nblocks(obj.size, size)
    if state["v"] == 1:  # a list of block numbers
        pairs = [(first, end) for first, end in runs_of(int(i) for i in state.get("done", ()))]
    else:
        pairs = [(int(first), int(end)) for first, end in state.get("runs", ())]
    runs = tuple((max(0, first), min(n, end)) for first, end in pairs if max(0, first) < min(n, end))
    return Record(int(state["ino"]), size, runs)


def record_of(obj: RemoteObject, block_size: int, ino: int, done: Iterable[int]) -> bytes:
    """The record (format 2) of the blocks `done` of `obj`'s sparse file `ino`."""
    state = {"v": 2, "bucket": obj.bucket, "key": obj.key, "etag": obj.etag, "size": obj.size,
             "block_size": block_size, "ino": ino, "runs": runs_of(done)}
    return json.dumps(state, separators=(",", ":")).encode()
