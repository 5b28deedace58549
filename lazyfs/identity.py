"""Identity records: what object version a local file is a copy of.

A published file carries its identity (bucket, key, ETag, size, Last-Modified,
origin) in the extended attribute `user.lazyfs.identity`, written on the
temporary file before the rename, so the record and the bytes change in one
atomic step.

All functions block: call them from worker threads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass

from lazyfs.namespace import RemoteObject

log = logging.getLogger(__name__)

IDENTITY_XATTR = "user.lazyfs.identity"
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass(frozen=True, slots=True)
class Identity:
    bucket: str
    key: str
    etag: str
    size: int
    mtime_ns: int
    # "fetch": downloaded by a mount (the cache budget may evict it);
    # "bake": put there by `lazyfs bake` for a production image (never evicted);
    # "prebaked": an admin's copy whose content was checked (--verify etag).
    origin: str = "fetch"

    @classmethod
    def of(cls, obj: RemoteObject, origin: str = "fetch") -> Identity:
        return cls(obj.bucket, obj.key, obj.etag, obj.size, obj.mtime_ns, origin)

    def encode(self) -> bytes:
        return json.dumps({"v": 1, "bucket": self.bucket, "key": self.key, "etag": self.etag,
                           "size": self.size, "mtime_ns": self.mtime_ns, "origin": self.origin},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Identity | None:
        try:
            d = json.loads(raw)
            if d.get("v") != 1:
                return None
            return cls(str(d["bucket"]), str(d["key"]), str(d["etag"]), int(d["size"]),
                       int(d["mtime_ns"]), str(d.get("origin", "fetch")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def matches(self, obj: RemoteObject) -> bool:
        # (ETag, size) identifies the bytes; the key may differ (same file
        # under another version's folder).
        return self.etag == obj.etag and self.size == obj.size


class IdentityRecords:
    """Reads and writes the records of one store's files."""

    def __init__(self, store_path: str) -> None:
        self.store_path = store_path
        self.supported = True  # False once the filesystem refuses user xattrs

    def read(self, fd: int) -> Identity | None:
        try:
            return Identity.decode(os.getxattr(fd, IDENTITY_XATTR))
        except OSError as e:
            if e.errno not in (errno.ENODATA, *_NO_XATTR):
                log.debug("reading identity record: %s", e)
            return None

    def write(self, fd: int, ident: Identity) -> None:
        """Stamp an open file with the identity it is a copy of.  Needs write
        permission on the file: call it before the file is made read-only."""
        if not self.supported:
            return
        try:
            os.setxattr(fd, IDENTITY_XATTR, ident.encode())
        except OSError as e:
            if e.errno not in _NO_XATTR:
                raise
            self.supported = False
            log.warning("store %s does not support extended attributes: local copies "
                        "will be checked by size only", self.store_path)
