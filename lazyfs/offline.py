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
from lazyfs.listings import walk_local
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store


@dataclass(frozen=True, slots=True)
class StoreKnows:
    objects: list[RemoteObject]  # by key: the saved listings, and local files they do not name
    local: frozenset[str]  # keys with a file on disk, of whichever version

    def on_disk(self, store: Store) -> int:
        """How many of the objects have a current copy on disk: what an offline
        mount can read (the rest fail with EIO until the object store answers).
        A file on disk serves only the version it is a copy of: the store
        judges it as an open would (its recorded identity, or a prebaked
        copy's size)."""
        return sum(1 for obj in self.objects if obj.key in self.local and _current(store, obj))


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


def _current(store: Store, obj: RemoteObject) -> bool:
    copy = store.find_current(obj)
    if copy is None:
        return False
    os.close(copy.fd)
    return True
