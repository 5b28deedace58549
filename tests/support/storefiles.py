"""The store unit tests' common steps: a download's bytes published into a
store as a finished download would be, and what the store holds as current."""

from __future__ import annotations

import os

from lazyfs.filestate import FileState
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store


def publish(store: Store, o: RemoteObject, data: bytes, origin: str = "fetch", *, part: int = 4,
            listed: bool = False) -> bool:
    """`data` written into a download file of `o` and published (what
    Store.publish returns: whether it was placed)."""
    p = store.partials.open(o, part)
    os.pwrite(p.fd, data, 0)
    try:
        return store.publish(p, origin, listed=listed)
    finally:
        p.close()


def current_state(store: Store, o: RemoteObject) -> FileState | None:
    """CACHED or PREBAKED for the store's current copy of `o`, None without one."""
    copy = store.find_current(o)
    if copy is None:
        return None
    os.close(copy.fd)
    return copy.state
