"""A new download's room in the store: refused before a byte is fetched when
its file cannot fit, else its blocks taken when its file is made.

Free space alone cannot say whether a download fits beside the others
starting with it: six opens checking a 12 MiB store at once each see room
for their 4 MiB, and four of them then fail part-way with ENOSPC.  So every
download file gets its blocks up front (storewrite.preallocate: fallocate,
atomic in the filesystem), whatever its size, and a filesystem that has no
room for them by then refuses it with the same line as the check before.
The room taken counts in `statvfs` at once, for the next check of this
process and of any other one on the same store (another mount, a bake).

Where the filesystem does not allocate up front (fallocate refused, as by
some network filesystems) the file stays sparse and only the check
before stands: downloads started together may still run out part-way there.
Where it states no size (ramfs: f_blocks 0) nothing is judged or taken.

Blocking: called from the store thread that opens a download's file.
"""

from __future__ import annotations

import errno
import os

from lazyfs import wording
from lazyfs.errors import StoreError
from lazyfs.namespace import RemoteObject
from lazyfs.storewrite import preallocate


def check(tmp_fd: int, obj: RemoteObject, store_path: str) -> int | None:
    """Refuse a download that cannot fit, before fetching a byte of it;
    the bytes free, where the filesystem says."""
    st = os.statvfs(tmp_fd)
    free = st.f_bavail * st.f_frsize
    if st.f_blocks == 0:
        return None  # a filesystem that states no size (ramfs, some network ones): nothing to judge by
    if obj.size > free:
        raise refusal(obj, free, store_path)
    return free


def take(tmp_fd: int, fd: int, obj: RemoteObject, store_path: str) -> None:
    """Give the new download file `fd` (of `obj`'s size, `check` passed) its
    blocks; refused (ENOSPC, the file left empty) if the downloads admitted
    since the check took the room."""
    try:
        preallocate(fd, obj.size)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        st = os.statvfs(tmp_fd)
        raise refusal(obj, st.f_bavail * st.f_frsize, store_path) from None


def refusal(obj: RemoteObject, free: int, store_path: str) -> StoreError:
    needs, has = wording.sizes(obj.size, free)
    return StoreError(f"{wording.quoted(obj.uri)}: needs {needs} but the store {store_path} has {has} free",
                      errno.ENOSPC)
