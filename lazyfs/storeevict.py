"""The cache budget's work in the store: which files lazyfs fetched (the only
ones it may evict), and their eviction.

A file already gone when its turn comes (an operator removed it by hand, or
the store's folder above it went) is not a failure and was not evicted by
us: it is told at debug level and not counted; the budget forgets it all the
same, its room being free.

All functions block: call them from worker threads.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from typing import Iterable

from lazyfs import exhausted
from lazyfs.content_index import ContentIndex
from lazyfs.identity import IdentityRecords
from lazyfs.layer import FILE_FLAGS, Layer, still_there
from lazyfs.namespace import RESERVED_NAME
from lazyfs.partials import PartialFiles
from lazyfs.wording import quoted

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Evicted:
    """What an eviction removed: the keys of the files unlinked and the bytes they held."""

    keys: tuple[str, ...] = ()
    bytes: int = 0

    @property
    def files(self) -> int:
        return len(self.keys)


def fetched_files(root: Layer, identities: IdentityRecords) -> list[tuple[str, int, int]]:
    """(key, size, atime) of every file lazyfs fetched (origin "fetch"): the
    only ones the cache budget may evict.  Walks the store."""
    out = []
    for dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=root.fd):
        rel = os.path.normpath(dirpath)
        if rel.split("/", 1)[0] == RESERVED_NAME:
            continue
        for name in files:
            try:
                fd = os.open(name, FILE_FLAGS, dir_fd=dfd)
            except OSError:
                continue
            try:
                ident = identities.read(fd)
                st = os.fstat(fd)
                if ident is not None and ident.origin == "fetch" and stat.S_ISREG(st.st_mode):
                    out.append((name if rel == "." else f"{rel}/{name}", st.st_size, st.st_atime_ns))
            finally:
                os.close(fd)
    return out


@dataclass(frozen=True, slots=True)
class Evictor:
    """The parts of a store an eviction acts on."""

    root: Layer
    identities: IdentityRecords
    partials: PartialFiles
    index: ContentIndex


def evict(store: Evictor, keys: Iterable[str]) -> Evicted:
    """Remove fetched files (never anything else) from the store."""
    removed: list[str] = []
    freed = 0
    for key in keys:
        *dirs, name = key.split("/")
        try:
            dfd = store.root.open_dir(dirs)
        except FileNotFoundError:
            log.debug("%s was no longer in the store when evicted", quoted(key))
            continue
        except OSError as e:
            log.warning("could not evict %s from the store: %s", quoted(key), exhausted.strerror(e))
            continue
        try:
            size = _evict_one(store, dfd, name)
            if size is not None:
                removed.append(key)
                freed += size
        except FileNotFoundError:
            log.debug("%s was no longer in the store when evicted", quoted(key))
        except OSError as e:
            log.warning("could not evict %s from the store: %s", quoted(key), exhausted.strerror(e))
        finally:
            os.close(dfd)
    return Evicted(tuple(removed), freed)


def _evict_one(store: Evictor, dfd: int, name: str) -> int | None:
    """Unlink `name` if it is a file lazyfs fetched: the very file whose
    record was read (a publish may have renamed a newer one over it); its
    size, or None when it stays."""
    fd = os.open(name, FILE_FLAGS, dir_fd=dfd)
    try:
        with store.partials.publish_lock():
            st = os.fstat(fd)
            ident = store.identities.read(fd, st=st)
            if ident is None or ident.origin != "fetch" or not still_there(dfd, name, st):
                return None
            os.unlink(name, dir_fd=dfd)
            store.index.drop_if_unused(ident.etag, ident.size)
        store.identities.forget(fd)
        return st.st_size
    finally:
        os.close(fd)
