"""The store tests' common steps: a download's bytes published into a store
as a finished download would be, what the store holds as current, and the
store's folders removed by hand as an operator would."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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


def rm_rf(path: Path) -> None:
    """As `rm -rf`: a file lazyfs removes or renames meanwhile (a finished
    download's lock, a resume record's temporary file) is not an error."""
    def gone_already(_fn: object, _path: str, exc_info: tuple[type, BaseException, object]) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=gone_already)
