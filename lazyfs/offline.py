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
from lazyfs.listings import SavedListing, walk_local
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
    # By key: each folder's saved listing and the local files newer than it;
    # with no saved listing (a baked or prebaked store), every local file.
    objects: list[RemoteObject]
    local: frozenset[str]  # keys with a file on disk, of whichever version
    left_out: int = 0  # local files a saved listing no longer names: deleted objects' copies, not served

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
    """A complete saved listing is the truth about what exists: a file on disk
    it does not name was deleted from the object store before it was saved
    (the store keeps the bytes) and must not come back offline, unless the
    object is newer than the listing (a mount serving the saved listing asks
    the object store for the names it lacks, and may have fetched one)."""
    out: dict[str, RemoteObject] = {}
    local: set[str] = set()
    left_out: set[str] = set()
    for source in sources:
        saved = store.listings.load_dated(source.bucket, source.prefix)
        named = frozenset(o.key for o in saved.objects) if saved is not None else frozenset()
        for obj, _layer in walk_local(store.layers(), store.identities, source.bucket, source.prefix):
            local.add(obj.key)
            if saved is not None and obj.key not in named and not newer_than(obj, saved):
                left_out.add(obj.key)
            else:
                out.setdefault(obj.key, obj)
        for obj in saved.objects if saved is not None else ():
            out[obj.key] = obj  # the last listing is the best knowledge of versions
    return StoreKnows(sorted(out.values(), key=lambda o: o.key), frozenset(local), len(left_out.difference(out)))


def offline_objects(store: Store, sources: Sequence[Source]) -> list[RemoteObject]:
    return store_knows(store, sources).objects


def newer_than(obj: RemoteObject, saved: SavedListing) -> bool:
    """Whether a local file's object came after the listing was saved, by its
    Last-Modified (which lazyfs gives the files it fetches; an admin's copy's
    own mtime).  That is the object store's clock against ours, and a
    multipart upload's date is when it began: an object uploaded in the
    seconds before the save may be taken for deleted, and not be served until
    the object store answers (the safe side: a deleted one is never served)."""
    return obj.mtime_ns > saved.saved_ns


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
