"""Identity records: what object version a local file is a copy of.

A published file carries its identity (bucket, key, ETag, size, Last-Modified,
origin) in the extended attribute `user.lazyfs.identity`, written on the
temporary file before the rename, so the record and the bytes change in one
atomic step.  The record names the file's size and modification time as
lazyfs left them: new bytes written into the same inode (`cp` over it keeps
the inode and its xattrs) move the mtime, and the record no longer describes
the file, which is then judged as an unrecorded copy.  An mtime cut to whole
seconds (image layers: tar, Docker) still matches.

Where the filesystem refuses user extended attributes (tmpfs before Linux
6.6, ramfs, many NFS exports), the record is a sidecar file instead,
`.lazyfs/identities/<inode>`, written durably before the file is renamed into
place.  It names the file it describes by inode, size and modification time
(the object's Last-Modified, which lazyfs sets), so a file replaced by an
admin (a new inode, or new bytes in the same one, which moves the mtime) no
longer matches it and is judged as an unrecorded copy.  A record too big for
the file's extended attributes (ext4 keeps them in one 4 KiB block, so a key
of some thousands of bytes does not fit) is a sidecar too, on any store.  A
sidecar goes when its file's last link goes (eviction, a newer version
published over it).  A copy of the store (an image layer) gets new inodes:
its sidecars no longer apply, and its files are judged by size, as unrecorded
copies are.

All functions block: call them from worker threads.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeGuard

from lazyfs.layer import FILE_FLAGS, STORE_MODES, Layer, Permissions, remove, removed, write_small
from lazyfs.namespace import RESERVED_NAME, RemoteObject
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

IDENTITY_XATTR = "user.lazyfs.identity"
SIDECAR_FOLDER = (RESERVED_NAME, "identities")
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP}
# What setxattr says of a value with no room in this file's attributes: ext4
# ENOSPC (one block per file), the VFS E2BIG (over 64 KiB).  A disk really
# full fails the sidecar written instead as well, with its own ENOSPC.
_NO_ROOM = {errno.ENOSPC, errno.E2BIG}
_SIDECAR_MAX = 1 << 16
_SECOND = 10**9


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
    # How its content was checked: "CRC64NVME", "MD5", "MD5-multipart"...,
    # "unverified" (the store offered nothing to check against), or "" (a
    # record of an older lazyfs).
    verified: str = ""
    # The file's mtime when the record was written (IdentityRecords.write);
    # None in a record of an older lazyfs, whose files had mtime_ns.
    file_mtime_ns: int | None = None

    @classmethod
    def of(cls, obj: RemoteObject, origin: str = "fetch", verified: str = "") -> Identity:
        return cls(obj.bucket, obj.key, obj.etag, obj.size, obj.mtime_ns, origin, verified)

    def fields(self) -> dict[str, Any]:
        fields = {"v": 1, "bucket": self.bucket, "key": self.key, "etag": self.etag, "size": self.size,
                  "mtime_ns": self.mtime_ns, "origin": self.origin}
        if self.verified:
            fields["verified"] = self.verified
        if self.file_mtime_ns is not None:
            fields["file_mtime_ns"] = self.file_mtime_ns
        return fields

    def encode(self) -> bytes:
        return json.dumps(self.fields(), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Identity | None:
        """The record `raw` holds; None for anything else, never an exception:
        a user may `setfattr` any bytes on a store file, and a corrupt store
        holds anything, and both are a copy with no record."""
        return cls.from_fields(_parsed(raw))

    @classmethod
    def from_fields(cls, d: Any) -> Identity | None:
        """The record a parsed document holds: exactly the types lazyfs
        writes (a number given as text, a bool, a float or one past 64 bits
        is not one), else None."""
        if not isinstance(d, dict) or d.get("v") != 1:
            return None
        texts: list[Any] = [d.get("bucket"), d.get("key"), d.get("etag"), d.get("origin", "fetch"),
                            d.get("verified", "")]
        size, mtime, file_mtime = d.get("size"), d.get("mtime_ns"), d.get("file_mtime_ns")
        if not all(isinstance(t, str) for t in texts) or not _int64(size) or size < 0 or not _int64(mtime) \
                or not (file_mtime is None or _int64(file_mtime)):
            return None
        bucket, key, etag, origin, verified = texts
        return cls(bucket, key, etag, size, mtime, origin, verified, file_mtime)

    def matches(self, obj: RemoteObject) -> bool:
        # (ETag, size) identifies the bytes; the key may differ (same file
        # under another version's folder).
        return self.etag == obj.etag and self.size == obj.size

    def describes(self, st: os.stat_result) -> bool:
        """Is this the record of the file `st` as lazyfs left it: its size,
        and its mtime (exactly, or cut to a whole second by an image layer's
        tar)?  New bytes written in place move the mtime."""
        mtime = self.mtime_ns if self.file_mtime_ns is None else self.file_mtime_ns
        return st.st_size == self.size and st.st_mtime_ns in (mtime, mtime - mtime % _SECOND)


def _parsed(raw: bytes) -> Any:
    """`raw` as JSON; None where it is not (bad bytes, or nested too deeply
    for the parser, which raises RecursionError rather than ValueError)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _int64(n: object) -> TypeGuard[int]:
    """An integer as a file's size or time is held (a bool is no number here)."""
    return isinstance(n, int) and not isinstance(n, bool) and -(1 << 63) <= n < 1 << 63


def _tie(st: os.stat_result) -> list[int]:
    """What ties a sidecar to its file: inode, size, and the mtime lazyfs set."""
    return [st.st_ino, st.st_size, st.st_mtime_ns]


class Sidecars:
    """The sidecar records of one layer: `.lazyfs/identities/<inode>`."""

    def __init__(self, dir_fd: int, permissions: Permissions = STORE_MODES["private"]) -> None:
        self.fd = dir_fd
        self.permissions = permissions

    def read(self, st: os.stat_result) -> Identity | None:
        try:
            fd = os.open(str(st.st_ino), FILE_FLAGS, dir_fd=self.fd)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                doc = _parsed(f.read(_SIDECAR_MAX))
        except OSError:
            return None
        return Identity.from_fields(doc) if isinstance(doc, dict) and doc.get("file") == _tie(st) else None

    def write(self, st: os.stat_result, ident: Identity) -> None:
        # Readable as the store's files are (--store-mode): a reader who may
        # read a file may read its record, as an xattr would let it.
        write_small(self.fd, str(st.st_ino), json.dumps({**ident.fields(), "file": _tie(st)}).encode(),
                    self.permissions.file)
        os.fsync(self.fd)  # the record's name is durable before its file is renamed into place

    def forget(self, st: os.stat_result) -> None:
        """Drop the record of a file whose last link is gone.  Call it while the
        file is still open: its inode number cannot be reused before that."""
        remove(self.fd, str(st.st_ino))


def user_xattrs_work(dir_fd: int) -> bool:
    """Can files in this folder hold user extended attributes?  (A probe
    file, removed again; an error other than "not supported" says yes: it
    will show, with its cause, when a record is written.)"""
    name = f"xattr-probe.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.setxattr(fd, "user.lazyfs.probe", b"1")
    except OSError as e:
        return e.errno not in _NO_XATTR
    finally:
        os.close(fd)
        remove(dir_fd, name)
    return True


def user_xattrs_readable(dir_fd: int) -> bool:
    """Does this folder's filesystem keep user extended attributes?  Asked
    without writing (a read-only store): a filesystem with no handler for
    them says "not supported" to a read as well."""
    try:
        os.getxattr(dir_fd, "user.lazyfs.probe")
    except OSError as e:
        return e.errno not in _NO_XATTR
    return True


class IdentityRecords:
    """The records of one store's files and of its prebaked layers': xattrs
    where the filesystem keeps them, sidecars where it refuses them."""

    def __init__(self, root: Layer, permissions: Permissions = STORE_MODES["private"]) -> None:
        self.root = root
        self._mode = permissions  # of the store's sidecar folder and records, as of its files
        self.store_path = root.path
        self.supported = True  # False when the store's filesystem refuses user xattrs
        self._sidecars: dict[Layer, Sidecars] = {}
        self._lock = threading.Lock()

    def open(self, probe_dir_fd: int, prebaked: Iterable[Layer]) -> None:
        """Find out (with a probe file in `probe_dir_fd`) whether the store
        keeps user xattrs, and open the sidecar folders in use: the store's,
        and each prebaked layer's that has one."""
        if not user_xattrs_work(probe_dir_fd):
            self._use_sidecars()
        else:
            self._open_sidecars(create=False)  # records too big for an xattr, written by earlier runs
        self._open_prebaked(prebaked)

    def _open_prebaked(self, prebaked: Iterable[Layer]) -> None:
        for layer in prebaked:
            try:
                self._sidecars[layer] = Sidecars(layer.open_dir(SIDECAR_FOLDER))
            except OSError:
                pass  # baked where xattrs work, or not by lazyfs

    def open_to_read(self, prebaked: Iterable[Layer], unreadable: dict[str, str]) -> None:
        """As `open`, writing nothing (`status` of a read-only store, or of one
        this user may only read): a sidecar folder this user may not enter
        is added to `unreadable` (path in the store -> why)."""
        self.supported = user_xattrs_readable(self.root.fd)
        self._open_sidecars(create=False, unreadable=unreadable)
        self._open_prebaked(prebaked)

    def close(self) -> None:
        for sidecars in self._sidecars.values():
            os.close(sidecars.fd)
        self._sidecars.clear()

    def reopen(self, keep: Callable[[int], int]) -> None:
        """The store's sidecar folder was removed under the mount (storeheal.py):
        the next record made opens it again.  Its descriptor goes to `keep`,
        closed with the store (a thread may be using it)."""
        with self._lock:
            sidecars = self._sidecars.get(self.root)
            if sidecars is not None and removed(sidecars.fd):
                keep(self._sidecars.pop(self.root).fd)

    def moved(self, probe_dir_fd: int, keep: Callable[[int], int]) -> None:
        """The store moved to the folder made again at its path (storeheal.py),
        maybe on another filesystem: asked again, as at `open` (with a probe
        file in `probe_dir_fd`), whether it keeps user xattrs, and the sidecar
        folder there opened (one a store made on it holds).  The old folder's
        sidecars go to `keep`, closed with the store (a thread may be using
        them).  Never raises: where it cannot ask, `write` finds out (a
        sidecar where an xattr is refused)."""
        with self._lock:
            old = self._sidecars.pop(self.root, None)
        if old is not None:
            keep(old.fd)
        try:
            if not user_xattrs_work(probe_dir_fd):
                self._use_sidecars()
                return
            if not self.supported:
                log.info("store %s (the folder made again at its path) keeps user extended attributes: identity "
                         "records are kept in them again", self.store_path)
            self.supported = True
            self._open_sidecars(create=False)  # records too big for an xattr, or of a store made there before
        except OSError as e:
            log.warning("store %s: cannot tell whether the folder made again at its path keeps user extended "
                        "attributes (%s): the next identity record written tells", self.store_path, e)
            self.supported = True

    def _open_sidecars(self, create: bool = True, unreadable: dict[str, str] | None = None) -> Sidecars | None:
        with self._lock:  # store threads may find out at once
            if self.root not in self._sidecars:
                try:
                    self._sidecars[self.root] = Sidecars(self.root.open_dir(SIDECAR_FOLDER, create=create,
                                                                            mode=self._mode.folder), self._mode)
                except FileNotFoundError:
                    if create:
                        raise
                    return None
                except PermissionError as e:
                    if unreadable is None:
                        raise
                    unreadable["/".join(SIDECAR_FOLDER)] = e.strerror or str(e)
                    return None
            return self._sidecars[self.root]

    def _use_sidecars(self) -> Sidecars:
        sidecars = self._open_sidecars()
        assert sidecars is not None
        if self.supported:
            self.supported = False
            log.info("store %s does not keep user extended attributes: identity records are kept in "
                     "sidecar files (%s/%s)", self.store_path, self.store_path, "/".join(SIDECAR_FOLDER))
        return sidecars

    def read(self, fd: int, layer: Layer | None = None, st: os.stat_result | None = None) -> Identity | None:
        """The record of the open file `fd` in `layer` (the store by default),
        if it still describes the file (Identity.describes)."""
        st = st if st is not None else os.fstat(fd)
        ident = self._recorded(fd, layer, st)
        if ident is not None and not ident.describes(st):
            log.debug("identity record of a file changed since (size %d, mtime %d): not its record",
                      st.st_size, st.st_mtime_ns)
            return None
        return ident

    def _recorded(self, fd: int, layer: Layer | None, st: os.stat_result) -> Identity | None:
        try:
            return Identity.decode(os.getxattr(fd, IDENTITY_XATTR))
        except OSError as e:
            if e.errno not in (errno.ENODATA, *_NO_XATTR):
                log.debug("reading identity record: %s", e)
                return None
        sidecars = self._sidecars.get(layer or self.root)
        if sidecars is None:
            return None
        return sidecars.read(st)

    def write(self, fd: int, ident: Identity) -> None:
        """Stamp an open file of the store with the identity it is a copy of,
        and its size and mtime as they are now (Identity.describes).  Needs
        write permission on the file where it is an xattr: call it before the
        file is made read-only, and after its bytes and mtime are final."""
        ident = dataclasses.replace(ident, file_mtime_ns=os.fstat(fd).st_mtime_ns)
        if self.supported:
            record = ident.encode()
            try:
                os.setxattr(fd, IDENTITY_XATTR, record)
                return
            except OSError as e:
                if e.errno in _NO_ROOM:
                    self._too_big_for_an_xattr(fd, ident, len(record), e)
                    return
                if e.errno not in _NO_XATTR:
                    raise
        self._use_sidecars().write(os.fstat(fd), ident)

    def claim(self, fd: int, origin: str) -> bool:
        """Record the fetched file `fd` (origin "fetch") as `origin`'s (a bake
        that found it current: the cache budget never evicts a baked file).
        Whether it was; a file that is not fetched, or has no record, is left."""
        ident = self.read(fd)
        if ident is None or ident.origin != "fetch" or origin == "fetch":
            return False
        self.write(fd, dataclasses.replace(ident, origin=origin))
        return True

    def _too_big_for_an_xattr(self, fd: int, ident: Identity, size: int, e: OSError) -> None:
        """A record the filesystem has no room for in the file's extended
        attributes (a very long key): a sidecar, for this file only."""
        sidecars = self._open_sidecars()
        assert sidecars is not None
        sidecars.write(os.fstat(fd), ident)
        log.info("%s: its identity record (%d bytes) does not fit in the extended attributes of "
                 "the store's filesystem (setxattr: %s): kept in a sidecar file (%s/%s)",
                 quoted(f"s3://{ident.bucket}/{ident.key}"), size, errno.errorcode.get(e.errno or 0, e.strerror),
                 self.store_path, "/".join(SIDECAR_FOLDER))

    def forget(self, fd: int, *, only_if_unlinked: bool = True) -> None:
        """Drop the sidecar of the open store file `fd`: once its last link is
        gone (by default), or in any case (a file that will not be published)."""
        sidecars = self._sidecars.get(self.root)
        if sidecars is not None:
            st = os.fstat(fd)
            if st.st_nlink == 0 or not only_if_unlinked:
                sidecars.forget(st)
