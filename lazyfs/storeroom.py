"""A new download's room in the store: refused before a byte is fetched when
its file cannot fit, else its blocks taken when its file is made.

Free space alone cannot say whether a download fits beside the others
starting with it: six opens checking a 12 MiB store at once each see room
for their 4 MiB, and four of them then fail part-way with ENOSPC.  So every
download file gets its blocks up front (storewrite.preallocate: fallocate),
whatever its size, and a filesystem that has no room for them by then
refuses it with the same line as the check before.  The room taken counts
in `statvfs` at once, for the next check of this process and of any other
one on the same store (another mount, a bake).

fallocate is not atomic everywhere: tmpfs takes its pages one at a time and
gives them all back when it runs out, so two files allocated at once could
both be refused where one fitted (four opens of 40 MiB on a 100 MiB tmpfs:
one served, not two), and a check meanwhile reads a free figure that holds
for no moment ("needs 40 MiB but the store has 60 MiB free"). So this
process admits one download at a time into a store (the check and the
allocation together, under PartialFiles' lock), and a refusal that the free
space does not bear out (another process allocating, or giving back, at the
same moment) is asked again, a few times, before it stands.

A download resumed from what an earlier run left (partials.py) is admitted
the same way for the blocks its file has not got yet: refused before a byte
is fetched when they cannot fit (its file and record kept for a later try),
else given them, the bytes already there kept.  A file that holds all its
blocks (preallocated by the run that made it) needs nothing more.

Where the filesystem does not allocate up front (fallocate refused, as by
some network filesystems) the file stays sparse and only the check
before stands: downloads started together may still run out part-way there.
Where it states no size (ramfs: f_blocks 0) nothing is judged or taken.

Blocking: called from the store thread that opens a download's file.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Iterable, Sequence

from lazyfs import wording
from lazyfs.errors import StoreError
from lazyfs.namespace import RemoteObject
from lazyfs.storewrite import preallocate

# A refusal the free space does not bear out is asked again this many times, this long apart: the
# figure of a filesystem another process allocates on (or gives back to) at the same moment.
_ASKS = 5
_APART_S = 0.05


def check(tmp_fd: int, obj: RemoteObject, store_path: str, need: int | None = None) -> int | None:
    """Refuse a download that cannot fit (`need` bytes more, all of `obj`
    unless said), before fetching a byte of it; the bytes free, where the
    filesystem says."""
    need = obj.size if need is None else need
    for asked in range(_ASKS):
        st = os.statvfs(tmp_fd)
        if st.f_blocks == 0:
            return None  # a filesystem that states no size (ramfs, some network ones): nothing to judge by
        free = st.f_bavail * st.f_frsize
        if need <= free:
            return free
        if asked + 1 < _ASKS:
            time.sleep(_APART_S)
    raise refusal(obj, free, store_path, need)


def take(tmp_fd: int, fd: int, obj: RemoteObject, store_path: str,
         need: int | None = None, gaps: Sequence[tuple[int, int]] | None = None) -> None:
    """Give the download file `fd` (of `obj`'s size, `check` passed for its
    `need`) its blocks; refused (ENOSPC: a new file left empty, a resumed
    one's `gaps` given back) if the downloads admitted since the check took
    the room, and the free space then says so too."""
    need = obj.size if need is None else need
    for asked in range(_ASKS):
        try:
            preallocate(fd, obj.size, gaps)
            return
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        st = os.statvfs(tmp_fd)
        free = st.f_bavail * st.f_frsize
        if need > free:
            break  # the room is taken: refused
        if asked + 1 < _ASKS:
            time.sleep(_APART_S)  # refused, though the room is there now: taken for a moment by another
    raise refusal(obj, free, store_path, need) from None


def resume(tmp_fd: int, fd: int, obj: RemoteObject, store_path: str, block_size: int,
           runs: Iterable[tuple[int, int]]) -> None:
    """Give a resumed download's file `fd` the blocks it has not got (its
    blocks on disk: `runs` [first, end) of `block_size`), or refuse it
    before a byte is fetched, its bytes kept."""
    need = max(0, obj.size - os.fstat(fd).st_blocks * 512)
    if need == 0:
        return  # all its blocks held (preallocated when it was made)
    if check(tmp_fd, obj, store_path, need) is not None:
        take(tmp_fd, fd, obj, store_path, need, gaps(obj.size, block_size, runs))


def gaps(size: int, block_size: int, runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The byte ranges (offset, length) of a file of `size` outside `runs` of blocks."""
    out, at = [], 0
    for first, end in sorted(runs):
        if first * block_size > at:
            out.append((at, first * block_size - at))
        at = max(at, end * block_size)
    if size > at:
        out.append((at, size - at))
    return out


def refusal(obj: RemoteObject, free: int, store_path: str, need: int | None = None) -> StoreError:
    needs, has = wording.sizes(obj.size if need is None else need, free)
    return StoreError(f"{wording.quoted(obj.uri)}: needs {needs} but the store {store_path} has {has} free",
                      errno.ENOSPC)
