"""What a store holds of each file, for a report (`lazyfs status`, plain
store or lock): the files it could look at, and why any could not be.

A file whose look was refused a descriptor (`ulimit -n`: EMFILE; the
system's table full: ENFILE) was reported `missing`, a copy on disk said to
be absent.  It is not judged at all: counted, and the limit named, so the
summary says it could not be checked (not ready) instead of mislabelling it.
Blocking: the caller's thread (status runs no event loop while it looks).
"""

from __future__ import annotations

from typing import Iterable

from lazyfs import wording
from lazyfs.exhausted import DESCRIPTOR_ERRNOS, descriptors, remedy
from lazyfs.filestate import LocalState
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store


def look(store: Store, objs: Iterable[RemoteObject]) -> tuple[list[tuple[RemoteObject, LocalState]], str]:
    """Each file's state, and "" or why some files have none (`unchecked`)."""
    seen: list[tuple[RemoteObject, LocalState]] = []
    refused, err = 0, 0
    for obj in objs:
        try:
            seen.append((obj, store.local_state(obj)))
        except OSError as e:
            if e.errno not in DESCRIPTOR_ERRNOS:
                raise
            refused, err = refused + 1, err or e.errno
    return seen, unchecked(refused, err)


def unchecked(refused: int, err: int) -> str:
    """"2 files could not be checked: too many open files: this process's
    descriptor limit ... is 12; raise it (...)", or "" when none was refused."""
    if not refused:
        return ""
    limit = descriptors(err, whose="this process's")  # (only a command looks: status)
    return f"{wording.count(refused, 'file')} could not be checked: {limit}; {remedy(err)}"
