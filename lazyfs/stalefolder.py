"""A folder left in the store where a file must now be published.

How it happens: `c/x/y` was cached (so the store has a folder `c/x`), then
deleted in S3, and `c/x` is a file again.  Renaming a file over a folder
fails (EISDIR), so before this the publish failed at every open: the file
was downloaded again each time, logged an ERROR each time, and never became
ready.  (The opposite case, a stale file where a folder must be, is removed
by layer.Layer.open_dir.)

The rule: the folder is removed, and the file published, only when all of
these hold; otherwise the file serves its readers without being kept (so
each open fetches it again), and for a listed version a warning says why,
once per key per process, instead of an ERROR per open.

- The listing of the process publishing shows this very version at that
  path now (`listed`).  A listing never holds a file and a folder at one
  path: when S3 has both `c/x` and `c/x/y` (a key that is also a prefix),
  namespace.build_tree keeps the folder and skips the file, so a file there
  is never published; a listing that shows `c/x` as a file therefore wants
  nothing below it.  A download of an older listing's version finishing
  after a refresh turned the path back into a folder is not `listed`, and
  removes nothing.
- Everything below is a file lazyfs fetched (an identity record of origin
  "fetch": what the cache budget may evict) or a folder of such files.  An
  admin's copy, a baked file (a production image's), a copy --verify etag
  stamped, a symlink or anything else was put there on purpose, and may be
  what another process's configuration serves: kept.
- It runs under the store's publish lock, which every process takes to
  rename a file into a key path or unlink one (publish, eviction): no mount
  or bake sharing the store places or evicts a file in that folder between
  the check and the removal.  A publish in another process that opened the
  folder before it went finds its descriptor unlinked once it holds the lock,
  and opens the path again (Store._place).  Readers holding a removed file
  open keep reading it, as after an eviction.  Another process whose listing
  is older and still names a file below fetches it again when it is opened,
  and its publish puts the folder back (Layer.open_dir): the store follows
  the newest listing, and neither process ever fails a read over it.

Blocking: call it from a worker thread, under the publish lock.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Callable

from lazyfs.content_index import ContentIndex
from lazyfs.identity import IdentityRecords
from lazyfs.layer import DIR_FLAGS, FILE_FLAGS, still_there
from lazyfs.namespace import RemoteObject
from lazyfs.wording import quoted

log = logging.getLogger(__name__)


def clear(dfd: int, name: str, shown: str, identities: IdentityRecords, index: ContentIndex) -> str:
    """Remove the folder `name` in `dfd` (`shown` as that path in the store)
    if everything in it is a file lazyfs fetched (or a folder of them): ""
    when it is gone, else why it stays."""
    fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
    try:
        why = _why_kept(fd, shown, identities)
        if not why:
            why = _remove_below(fd, shown, identities, index)
    finally:
        os.close(fd)
    if why:
        return why
    try:
        os.rmdir(name, dir_fd=dfd)
    except OSError as e:  # something was put there meanwhile (a folder made by another publish)
        return f"it could not be removed ({e.strerror})"
    return ""


def _why_kept(fd: int, path: str, identities: IdentityRecords) -> str:
    with os.scandir(fd) as entries:
        for entry in entries:
            why = _why_entry_kept(fd, entry, path, identities)
            if why:
                return why
    return ""


def _why_entry_kept(fd: int, entry: os.DirEntry[str], path: str, identities: IdentityRecords) -> str:
    where = f"{path}/{entry.name}"
    st = entry.stat(follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        sub = os.open(entry.name, DIR_FLAGS, dir_fd=fd)
        try:
            return _why_kept(sub, where, identities)
        finally:
            os.close(sub)
    if not stat.S_ISREG(st.st_mode):
        return f"it holds {where}, which is not a regular file"
    if not _fetched(fd, entry.name, identities):
        return f"it holds {where}, which lazyfs did not fetch"
    return ""


def _fetched(dfd: int, name: str, identities: IdentityRecords) -> bool:
    fd = os.open(name, FILE_FLAGS, dir_fd=dfd)
    try:
        ident = identities.read(fd)
        return ident is not None and ident.origin == "fetch"
    finally:
        os.close(fd)


def _remove_below(fd: int, path: str, identities: IdentityRecords, index: ContentIndex) -> str:
    """Unlink the fetched files below `fd` (each checked again as it goes, as
    an eviction does) and the folders they leave empty."""
    with os.scandir(fd) as entries:
        for entry in entries:
            why = _remove_entry(fd, entry, path, identities, index)
            if why:
                return why
    return ""


def _remove_entry(fd: int, entry: os.DirEntry[str], path: str, identities: IdentityRecords,
                  index: ContentIndex) -> str:
    if stat.S_ISDIR(entry.stat(follow_symlinks=False).st_mode):
        sub = os.open(entry.name, DIR_FLAGS, dir_fd=fd)
        try:
            why = _remove_below(sub, f"{path}/{entry.name}", identities, index)
        finally:
            os.close(sub)
        if not why:
            os.rmdir(entry.name, dir_fd=fd)
        return why
    file_fd = os.open(entry.name, FILE_FLAGS, dir_fd=fd)
    try:
        st = os.fstat(file_fd)
        ident = identities.read(file_fd, st=st)
        if ident is None or ident.origin != "fetch" or not still_there(fd, entry.name, st):
            return f"{path}/{entry.name} changed while it was being removed"
        os.unlink(entry.name, dir_fd=fd)
        index.drop_if_unused(ident.etag, ident.size)
        identities.forget(file_fd)
    finally:
        os.close(file_fd)
    return ""


class StaleFolders:
    """Publishing over such folders, and saying once per key when one stays."""

    def __init__(self, identities: IdentityRecords, index: ContentIndex) -> None:
        self.identities = identities
        self.index = index
        self._told: set[str] = set()  # keys whose folder stays (store threads: set operations only)

    def place(self, rename: Callable[[], None], dfd: int, name: str, obj: RemoteObject, listed: bool) -> bool:
        """`rename` the file to `name` in `dfd`; a folder standing there is
        removed first if the rule above allows (then True), else nothing is
        placed (False) and the reason is logged, once per key."""
        try:
            rename()
            return True
        except IsADirectoryError:
            pass
        if not listed:  # an old listing's version, or a link of the same bytes (Store.materialise)
            log.debug("%s: a folder stands at %s in the store; not placed", quoted(obj.uri), quoted(obj.key))
            return False
        why = clear(dfd, name, obj.key, self.identities, self.index)
        if why:
            if obj.key not in self._told:
                self._told.add(obj.key)
                log.warning("%s: a folder stands at %s in the store and is kept (%s): the file is served "
                            "without being kept (said once)", quoted(obj.uri), quoted(obj.key), why)
            return False
        log.warning("%s: removed the folder at %s in the store, which held only fetched files the listing "
                    "no longer shows", quoted(obj.uri), quoted(obj.key))
        rename()
        return True
