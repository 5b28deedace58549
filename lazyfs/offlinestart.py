"""A mount's start without the object store: what it then serves
(offline.py: what the store knows), or why it cannot start.

Blocking (store_knows walks the store): run before the mount.
"""

from __future__ import annotations

import logging

from lazyfs import wording
from lazyfs.config import MountConfig
from lazyfs.errors import RemoteError
from lazyfs.mounttab import MountError
from lazyfs.namespace import RemoteObject
from lazyfs.offline import store_knows
from lazyfs.store import Store

log = logging.getLogger(__name__)


def offline_start(store: Store, cfg: MountConfig, error: RemoteError) -> list[RemoteObject]:
    """The object store is unreachable: serve what is on disk, or fail (a saved listing alone serves only EIO)."""
    known = store_knows(store, cfg.sources)
    files, on_disk = wording.count(len(known.objects), "file"), known.on_disk(store, cfg.fetch.verify_prebaked)
    if not on_disk:
        listed = f" (it knows {files}, none of them on disk)" if known.objects else ""
        raise MountError(f"{error}, and the store {cfg.store_path} has nothing to serve for "
                         f"{', '.join(s.uri for s in cfg.sources)}{listed}") from None
    gone = (f"; {wording.count(known.left_out, 'file')} on disk that the saved listing no longer names (deleted "
            "from the object store) not served") if known.left_out else ""
    log.warning("%s: starting offline with the %s the store knows, %s; the others fail with EIO until the object "
                "store is reachable again%s", error, files, on_disk.said(), gone)
    return known.objects
