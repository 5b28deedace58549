"""Freeing the store's leftovers once a whole live listing says what is
current: downloads of versions nobody lists any more (in tmp/), and the bytes
of files deleted from the store that only the content index still linked
(Store.sweep).  Never with an offline or partial listing: the index entries
of a store copied without its hard links stay (ContentIndex.sweep).

The walk runs in a worker thread under the limiter it is given (the bulk
work's: it must not hold up the open path's store threads).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from lazyfs.catalog import Catalog
from lazyfs.exhausted import strerror
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store
from lazyfs.threads import run_sync

log = logging.getLogger(__name__)

OFFLINE_POLL_S = 5.0  # while offline, how often to look whether a live listing is back


async def sweep(store: Store, listing: list[RemoteObject], limiter: trio.CapacityLimiter,
                kept: Callable[[RemoteObject], bool] | None = None) -> None:
    """Free what `listing` (a whole live one) no longer needs; one log line.
    A listed file `kept` says no to (one larger than the cache budget) keeps
    no resumable download either: the budget would never keep what it resumes."""
    keep = listing if kept is None else [o for o in listing if kept(o)]
    try:
        freed = await run_sync(store.sweep, keep, limiter=limiter)
    except OSError as e:
        log.warning("could not sweep the store's leftovers: %s", strerror(e))
        return
    if freed:
        log.info("store sweep: freed %.1f MiB of leftovers (old versions' downloads, unlinked copies, "
                 "files deleted from the store)", freed / 2**20)


async def after_first_listing(catalog: Catalog, store: Store, limiter: trio.CapacityLimiter,
                              kept: Callable[[RemoteObject], bool] | None = None) -> None:
    """A mount's sweep: once the first whole live listing is in."""
    await catalog.listed.wait()
    while catalog.offline or not catalog.last.ok:
        await trio.sleep(OFFLINE_POLL_S)
    await sweep(store, list(catalog.tree.files()), limiter, kept)
