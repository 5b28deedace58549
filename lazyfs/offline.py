"""What the store knows without the object store: each folder's last saved
listing, and the files on disk (the store and the prebaked layers).  A mount
that cannot reach the object store at start serves it (an *offline* start),
and so does one whose first listing fails (the saved listing, meanwhile).

Blocking (walks directories, opens files): run in a thread or before the mount.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from lazyfs.config import Source
from lazyfs.filestate import FileState
from lazyfs.listings import walk_local
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store


@dataclass(frozen=True, slots=True)
class OnDisk:
    """The objects an offline mount has a copy of, as an open will judge them."""

    current: int  # served as they are: recorded as this version (or, judged by size, unrecorded copies)
    # Unrecorded copies of the right size whose content an open checks first
    # (--verify etag): served only if it matches, so not counted as current.
    unchecked: int = 0

    def __bool__(self) -> bool:
        return bool(self.current or self.unchecked)

    def said(self) -> str:
        """What an offline start's line says of them (the unchecked ones are on disk too)."""
        unchecked = (f" ({self.unchecked} with no identity record, checked by content when opened: one that "
                     "does not match is not served)") if self.unchecked else ""
        return f"{self.current + self.unchecked} of them on disk{unchecked}"


@dataclass(frozen=True, slots=True)
class StoreKnows:
    objects: list[RemoteObject]  # by key: the saved listings, and local files they do not name
    local: frozenset[str]  # keys with a file on disk, of whichever version

    def on_disk(self, store: Store, checks_content: bool) -> OnDisk:
        """Which of the objects have a copy on disk: what an offline mount can
        read (the rest fail with EIO until the object store answers).  A file
        on disk serves only the version it is a copy of: the store judges it
        as an open would.  A copy whose identity record names the version is
        current; one with no record (an admin's copy) and the right size is
        current too, unless opens check such a copy's content
        (`checks_content`: --verify etag, a pinned mount): then it is counted
        apart, not hashed here (a start must stay cheap; an open checks it)."""
        current = unchecked = 0
        for obj in self.objects:
            if obj.key in self.local:
                state = _state(store, obj, checks_content)
                if state is FileState.CACHED or (state is FileState.PREBAKED and not checks_content):
                    current += 1
                elif state is FileState.PREBAKED:
                    unchecked += 1
        return OnDisk(current, unchecked)


def store_knows(store: Store, sources: Sequence[Source]) -> StoreKnows:
    out: dict[str, RemoteObject] = {}
    local: set[str] = set()
    for source in sources:
        for obj, _layer in walk_local(store.layers(), store.identities, source.bucket, source.prefix):
            out.setdefault(obj.key, obj)
            local.add(obj.key)
        saved = store.listings.load(source.bucket, source.prefix)
        for obj in saved or ():
            out[obj.key] = obj  # the last listing is the best knowledge of versions
    return StoreKnows(sorted(out.values(), key=lambda o: o.key), frozenset(local))


def _state(store: Store, obj: RemoteObject, checks_content: bool) -> FileState | None:
    """How the copy an open would find first is judged (None: no current
    copy).  With `checks_content`, a recorded copy in a later layer is found
    before an unrecorded one, as an open that rejected the first would."""
    copy = store.find_current(obj, (lambda o, c: False) if checks_content else None)
    if copy is None and checks_content:
        copy = store.find_current(obj)  # an unrecorded copy of the right size, then
    if copy is None:
        return None
    os.close(copy.fd)
    return copy.state
