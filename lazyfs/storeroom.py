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

from lazyfs import wording
from lazyfs.errors import StoreError
from lazyfs.namespace import RemoteObject
from lazyfs.storewrite import preallocate

# A refusal the free space does not bear out is asked again this many times, this long apart: the
# figure of a filesystem another process allocates on (or gives back to) at the same moment.
_ASKS = 5
_APART_S = 0.05


def check(tmp_fd: int, obj: RemoteObject, store_path: str) -> int | None:
    """Refuse a download that cannot fit, before fetching a byte of it;
    the bytes free, where the filesystem says."""
    for asked in range(_ASKS):
        st = os.statvfs(tmp_fd)
        if st.f_blocks == 0:
            return None  # a filesystem that states no size (ramfs, some network ones): nothing to judge by
        free = st.f_bavail * st.f_frsize
        if obj.size <= free:
            return free
        if asked + 1 < _ASKS:
            time.sleep(_APART_S)
    raise refusal(obj, free, store_path)


def take(tmp_fd: int, fd: int, obj: RemoteObject, store_path: str) -> None:
    """Give the new download file `fd` (of `obj`'s size, `check` passed) its
    blocks; refused (ENOSPC, the file left empty) if the downloads admitted
    since the check took the room, and the free space then says so too."""
    for asked in range(_ASKS):
        try:
            preallocate(fd, obj.size)
            return
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        st = os.statvfs(tmp_fd)
        free = st.f_bavail * st.f_frsize
        if obj.size > free:
            break  # the room is taken: refused
        if asked + 1 < _ASKS:
            time.sleep(_APART_S)  # refused, though the room is there now: taken for a moment by another
    raise refusal(obj, free, store_path) from None


def refusal(obj: RemoteObject, free: int, store_path: str) -> StoreError:
    needs, has = wording.sizes(obj.size, free)
    return StoreError(f"{wording.quoted(obj.uri)}: needs {needs} but the store {store_path} has {has} free",
                      errno.ENOSPC)
