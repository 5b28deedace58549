"""The content index, `.lazyfs/objects/`: a hard link to every published file
under a name derived from its (ETag, size), so a new path with the same bytes
(a new model version folder sharing files with the old one) is linked, not
fetched.

All functions block: call them from worker threads.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable, ContextManager

from lazyfs.layer import FILE_FLAGS
from lazyfs.namespace import RemoteObject

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
            log.debug("not indexing %s: %s", obj.uri, e.strerror)

    def drop_if_unused(self, etag: str, size: int) -> None:
        """Remove the entry once no published path links to it any more.  Call
        it under the store's publish lock: no path can be linked meanwhile."""
        self._drop_named(self.entry_name(etag, size))

    def _drop_named(self, name: str) -> int:
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if st.st_nlink > 1:
                return 0
            os.unlink(name, dir_fd=self.fd)
        except OSError:
            return 0
        return st.st_blocks * 512

    def sweep(self, publish_lock: Callable[[], ContextManager[None]]) -> int:
        """Remove every entry no published path links to (their paths were
        deleted outside lazyfs); bytes freed."""
        freed = 0
        for name in os.listdir(self.fd):
            with publish_lock():
                freed += self._drop_named(name)
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
