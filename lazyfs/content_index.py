"""The content index, `.lazyfs/objects/`: a hard link to every published file
under a name derived from its (ETag, size), so a new path with the same bytes
(a new model version folder sharing files with the old one) is linked, not
fetched.

An entry is a link like any other: the bytes of a file deleted from the store
(`rm`) stay on disk while its entry does.  The sweep at start-up (`sweep`,
once the first listing is in) removes entries no published path links to any
more, except where the path the entry's record names holds the same bytes as
a file of its own (a store copied without its hard links: `cp -r`, some image
builds), where the entry is still what links a new version's unchanged files.

All functions block: call them from worker threads.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable, ContextManager

from lazyfs.errors import UnsafeKey
from lazyfs.identity import IdentityRecords
from lazyfs.layer import FILE_FLAGS, Layer
from lazyfs.namespace import RemoteObject, key_parts
from lazyfs.wording import quoted

log = logging.getLogger(__name__)


class ContentIndex:
    def __init__(self, objects_fd: int) -> None:
        self.fd = objects_fd

    @staticmethod
    def entry_name(etag: str, size: int) -> str:
        return hashlib.sha256(f"{etag}\0{size}".encode()).hexdigest()[:40]

    def add(self, dfd: int, name: str, obj: RemoteObject) -> None:
        """Link the published file `name` (in folder `dfd`) under its (ETag, size)."""
        if not obj.etag:
            return
        try:
            os.link(name, self.entry_name(obj.etag, obj.size), src_dir_fd=dfd, dst_dir_fd=self.fd,
                    follow_symlinks=False)
        except FileExistsError:
            pass  # the same bytes are indexed already
        except OSError as e:
            log.debug("not indexing %s: %s", quoted(obj.uri), e.strerror)

    def drop_if_unused(self, etag: str, size: int) -> None:
        """Remove the entry once no published path links to it any more.  Call
        it under the store's publish lock: no path can be linked meanwhile."""
        self._drop_named(self.entry_name(etag, size))

    def _drop_named(self, name: str, copied: Callable[[int], bool] | None = None) -> int:
        """Unlink the entry `name` if no other path links to it (and, with
        `copied`, unless that says the bytes are copied elsewhere); bytes freed."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if st.st_nlink > 1 or (copied is not None and _asks(copied, self.fd, name)):
                return 0
            os.unlink(name, dir_fd=self.fd)
        except OSError:
            return 0
        return st.st_blocks * 512

    def sweep(self, publish_lock: Callable[[], ContextManager[None]], identities: IdentityRecords,
              root: Layer) -> int:
        """Remove every entry no published path links to (their paths were
        deleted outside lazyfs), unless its path holds the same bytes as a
        file of its own (a store copied without its hard links); bytes freed.
        Never an entry another path links to: those have a link count above 1."""

        def copied(fd: int) -> bool:
            return _copy_at_its_path(fd, identities, root)

        freed = 0
        for name in os.listdir(self.fd):
            with publish_lock():
                freed += self._drop_named(name, copied)
        return freed

    def open(self, obj: RemoteObject) -> int | None:
        """A read-only descriptor of an indexed file with `obj`'s (ETag, size), if any."""
        if not obj.etag:
            return None
        try:
            return os.open(self.entry_name(obj.etag, obj.size), FILE_FLAGS, dir_fd=self.fd)
        except OSError:
            return None

    def link_to(self, obj: RemoteObject, dst_dir_fd: int, dst_name: str) -> None:
        """Hard-link the entry of `obj` to `dst_name` (OSError where links fail)."""
        os.link(self.entry_name(obj.etag, obj.size), dst_name, src_dir_fd=self.fd, dst_dir_fd=dst_dir_fd,
                follow_symlinks=False)


def _asks(question: Callable[[int], bool], dir_fd: int, name: str) -> bool:
    fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    try:
        return question(fd)
    finally:
        os.close(fd)


def _copy_at_its_path(entry: int, identities: IdentityRecords, root: Layer) -> bool:
    """Does the key path an entry's record names hold a file of its own with
    the same (ETag, size)?  Yes too when the entry has no record (a copy that
    lost its xattrs): nothing says it is unused."""
    ident = identities.read(entry)
    if ident is None:
        return True
    try:
        *dirs, name = key_parts(ident.key)
        dfd = root.open_dir(dirs)
    except (UnsafeKey, OSError):
        return False
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dfd)
    except OSError:
        return False
    finally:
        os.close(dfd)
    try:
        there = identities.read(fd)
        return there is not None and there.etag == ident.etag and there.size == ident.size
    finally:
        os.close(fd)
