"""The on-disk store: published files, in-progress downloads, identity records.

Layout (version 1), under one directory the process holds open as a descriptor:

    <root>/<key path>          published files, exactly where the mount shows them
    <root>/.lazyfs/layout      "1": the layout version of everything below
    <root>/.lazyfs/tmp/        downloads in progress: <id>.part (sparse) and
                               <id>.json (which chunks are on disk, for resume)
    <root>/.lazyfs/objects/    hard links to published files by (ETag, size): a
                               new path with the same content is linked, not fetched
    <root>/.lazyfs/listings/   the last complete listing of each folder (offline start)

Every path is resolved one component at a time with openat(O_NOFOLLOW) under a
layer's descriptor, so a symlink planted in the store or in a prebaked layer is
never followed, and nothing is read or written outside them.  Because the root
descriptor was opened before the mount covered it, the daemon never touches its
own mountpoint (which would deadlock).

A published file carries its identity (bucket, key, ETag, size, Last-Modified)
in the extended attribute `user.lazyfs.identity`, written on the temporary file
before the rename, so the record and the bytes change in one atomic step.

All methods block: call them from worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from lazyfs.errors import StoreError
from lazyfs.namespace import RESERVED_NAME, RemoteObject

log = logging.getLogger(__name__)

LAYOUT_VERSION = "1"
IDENTITY_XATTR = "user.lazyfs.identity"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted where a file should be must not hang the open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass(frozen=True, slots=True)
class Identity:
    """What a local file is a copy of."""

    bucket: str
    key: str
    etag: str
    size: int
    mtime_ns: int
    # "fetch": downloaded by a mount (the cache budget may evict it);
    # "bake": put there by `lazyfs bake` for a production image (never evicted);
    # "verify": an admin's copy whose content was checked (--verify etag).
    origin: str = "fetch"

    @classmethod
    def of(cls, obj: RemoteObject, origin: str = "fetch") -> "Identity":
        return cls(obj.bucket, obj.key, obj.etag, obj.size, obj.mtime_ns, origin)

    def encode(self) -> bytes:
        return json.dumps({"v": 1, "bucket": self.bucket, "key": self.key, "etag": self.etag,
                           "size": self.size, "mtime_ns": self.mtime_ns, "origin": self.origin},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Identity | None":
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


class Layer:
    """A directory tree opened by descriptor: the store or a prebaked layer."""

    def __init__(self, fd: int, path: str, writable: bool, label: str) -> None:
        self.fd = fd
        self.path = path
        self.writable = writable
        self.label = label

    @classmethod
    def open(cls, path: str, writable: bool, label: str) -> "Layer":
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot open {label} {path}: {e.strerror}", e.errno) from None
        return cls(fd, path, writable, label)

    def close(self) -> None:
        os.close(self.fd)

    def open_dir(self, parts: Iterable[str], create: bool = False, mode: int = 0o755) -> int:
        """A descriptor of the directory at `parts` under this layer (caller closes).
        With `create`, missing directories are made, and a stale file or symlink
        standing where a directory must be is removed."""
        fd = os.dup(self.fd)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if not create or e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        raise
                    if e.errno != errno.ENOENT:
                        log.warning("%s: removing %r, which stands where a folder must be",
                                    self.label, part)
                        os.unlink(part, dir_fd=fd)
                    try:
                        os.mkdir(part, mode, dir_fd=fd)
                    except FileExistsError:
                        pass  # another thread made it first
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def open_file(self, path: str) -> int | None:
        """A read-only descriptor of the regular file at `path`, or None when there
        is none (missing, a directory, a symlink, a device or FIFO)."""
        *dirs, name = path.split("/")
        try:
            dfd = self.open_dir(dirs)
        except OSError:
            return None
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                log.warning("%s: ignoring symlink at %s", self.label, path)
            return None
        finally:
            os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd


class FileMap:
    """Bytes of a local file served straight from the page cache.

    A read-only shared mapping lets a FUSE reply be written to the kernel from
    the page cache without a copy into Python, which is what makes the first
    read of a cached file faster than pread.  Touched pages count towards the
    process's RSS, so the mapping's page table entries are dropped
    (MADV_DONTNEED: the page cache itself stays) every `_DROP_EVERY` bytes
    served, keeping RSS bounded whatever the file size and however many
    files are being read.

    Caveat: a file truncated in place under the mapping (nobody should edit
    the store while it is mounted) would raise SIGBUS.
    """

    _DROP_EVERY = 8 * 1024 * 1024
    # Across all mappings: after this many bytes served, every mapping that
    # served any drops its entries, so hundreds of open files cannot add up.
    # Set from --memory-limit (see set_budget).  Reads run on the trio
    # thread only, so these class-level counters need no lock.
    _GLOBAL_EVERY = 64 * 1024 * 1024
    _recent = 0
    _dirty: set["FileMap"] = set()

    @classmethod
    def set_budget(cls, nbytes: int) -> None:
        cls._GLOBAL_EVERY = max(4 * 1024 * 1024, nbytes)
        cls._DROP_EVERY = min(cls._DROP_EVERY, cls._GLOBAL_EVERY)

    def __init__(self, fd: int, size: int) -> None:
        self._mm = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
        self._view = memoryview(self._mm) if self._mm is not None else memoryview(b"")
        self._served = 0

    def read(self, off: int, size: int) -> memoryview:
        if self._served >= self._DROP_EVERY:
            self._drop()
        if FileMap._recent >= FileMap._GLOBAL_EVERY:
            FileMap._recent = 0
            for fmap in list(FileMap._dirty):
                fmap._drop()
        data = self._view[off:off + size]
        self._served += len(data)
        FileMap._recent += len(data)
        FileMap._dirty.add(self)
        return data

    def _drop(self) -> None:
        self._served = 0
        FileMap._dirty.discard(self)
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        FileMap._dirty.discard(self)
        self._view.release()
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a reply still holds a slice: the mapping goes with it
            self._mm = None


@dataclass(frozen=True, slots=True)
class LocalState:
    state: str  # cached | prebaked | partial | stale | missing
    layer: str  # which layer holds it ("store", "prebaked layer"), or ""
    bytes: int  # bytes of this version on disk


@dataclass(slots=True)
class LocalCopy:
    """An open, current local copy of an object."""

    fd: int
    layer: Layer
    # "cached": lazyfs (or `lazyfs bake`) recorded it as this version;
    # "prebaked": it was on disk already and matches by size, as the seed's rule says.
    state: str


class Partial:
    """A download in progress: a sparse file of the object's full size in
    .lazyfs/tmp, plus a record of which fixed-size blocks are on disk.

    The record names the sparse file's inode: a record can then only ever
    describe the file it was written for, even if a late write of it races
    the removal of a failed download and a fresh one under the same name."""

    def __init__(self, store: "Store", obj: RemoteObject, fd: int, part_size: int,
                 done: set[int]) -> None:
        self.store = store
        self.obj = obj
        self.fd = fd
        self.part_size = part_size
        self.done = done
        self.name = store.partial_name(obj)
        self.ino = os.fstat(fd).st_ino

    @property
    def chunks(self) -> int:
        return max(1, -(-self.obj.size // self.part_size))

    def save_state(self, done: Iterable[int]) -> None:
        """Make the chunks in `done` durable, then record them (in that order, so
        a chunk is never recorded before its bytes would survive a power loss).
        `done` is a snapshot: the caller's set may change while this runs."""
        os.fdatasync(self.fd)
        state = {"v": 1, "bucket": self.obj.bucket, "key": self.obj.key, "etag": self.obj.etag,
                 "size": self.obj.size, "part_size": self.part_size, "ino": self.ino,
                 "done": sorted(done)}
        self.store._write_small(self.name + ".json", json.dumps(state).encode())


class Store:
    """The store layer (writable) and the prebaked layers searched after it."""

    def __init__(self, root: Layer, prebaked: Iterable[Layer] = ()) -> None:
        self.root = root
        self.prebaked = tuple(prebaked)
        self.records = True  # False once the filesystem refuses user xattrs
        self._meta_fd = -1
        self._tmp_fd = -1
        self._objects_fd = -1

    @classmethod
    def open(cls, store_path: str, prebaked: Iterable[str] = (), root_fd: int | None = None) -> "Store":
        root = Layer(root_fd, store_path, True, "store") if root_fd is not None \
            else Layer.open(store_path, True, "store")
        layers = [Layer.open(p, False, "prebaked layer") for p in prebaked]
        store = cls(root, layers)
        store._prepare()
        return store

    def _prepare(self) -> None:
        try:
            self._meta_fd = self.root.open_dir([RESERVED_NAME], create=True)
            # Downloads in progress are private to the daemon.
            self._tmp_fd = self.root.open_dir([RESERVED_NAME, "tmp"], create=True, mode=0o700)
            self._objects_fd = self.root.open_dir([RESERVED_NAME, "objects"], create=True, mode=0o700)
        except OSError as e:
            raise StoreError(f"store {self.root.path} is not writable: {e.strerror}", e.errno) from None
        try:
            fd = os.open("layout", _FILE_FLAGS, dir_fd=self._meta_fd)
            with os.fdopen(fd, "rb") as f:
                version = f.read(64).decode(errors="replace").strip()
            if version != LAYOUT_VERSION:
                raise StoreError(f"store {self.root.path} has layout version {version!r}; this lazyfs "
                                 f"uses {LAYOUT_VERSION}: use another --store or remove "
                                 f"{self.root.path}/{RESERVED_NAME}", errno.EINVAL)
        except FileNotFoundError:
            self._write_small("layout", (LAYOUT_VERSION + "\n").encode(), dir_fd=self._meta_fd)

    def close(self) -> None:
        for fd in (self._tmp_fd, self._meta_fd, self._objects_fd):
            if fd >= 0:
                os.close(fd)
        self._tmp_fd = self._meta_fd = self._objects_fd = -1
        for layer in self.prebaked:
            layer.close()
        self.root.close()

    def layers(self) -> tuple[Layer, ...]:
        return (self.root,) + self.prebaked

    # -- lookups -------------------------------------------------------------

    def find_current(self, obj: RemoteObject) -> LocalCopy | None:
        """An open local copy that is current for `obj`, searching the store, then
        each prebaked layer.  A copy with an identity record is current when the
        record names this version; one without (copied in by an admin) when its
        size matches.  Anything else is not current, never an error: the cache
        can make reads faster but never makes them fail."""
        for layer in self.layers():
            fd = layer.open_file(obj.key)
            if fd is None:
                continue
            state = self._judge(fd, obj)
            if state is not None:
                return LocalCopy(fd, layer, state)
            os.close(fd)
        return None

    def local_state(self, obj: RemoteObject) -> "LocalState":
        """What is on disk for `obj`, without fetching anything: "cached" or
        "prebaked" (a current copy, see find_current), "partial" (an
        interrupted download of this version), "stale" (only another version),
        or "missing"."""
        stale = None
        for layer in self.layers():
            fd = layer.open_file(obj.key)
            if fd is None:
                continue
            try:
                state = self._judge(fd, obj)
                if state is not None:
                    return LocalState(state, layer.label, obj.size)
                stale = stale or layer.label
            finally:
                os.close(fd)
        chunks, nbytes = self._resumable_chunks(self.partial_name(obj), obj, None)
        if chunks:
            return LocalState("partial", "store", nbytes)
        if stale:
            return LocalState("stale", stale, 0)
        return LocalState("missing", "", 0)

    def _judge(self, fd: int, obj: RemoteObject) -> str | None:
        if os.fstat(fd).st_size != obj.size:
            return None
        ident = self.read_identity(fd)
        if ident is None:
            return "prebaked"
        return "cached" if ident.matches(obj) else None

    def read_identity(self, fd: int) -> Identity | None:
        try:
            return Identity.decode(os.getxattr(fd, IDENTITY_XATTR))
        except OSError as e:
            if e.errno not in (errno.ENODATA, *_NO_XATTR):
                log.debug("reading identity record: %s", e)
            return None

    # -- downloads -------------------------------------------------------------

    @staticmethod
    def partial_name(obj: RemoteObject) -> str:
        # One name per object *version*: two versions of a key downloading at
        # once (an old handle and a new open) never share a file.
        ident = f"{obj.bucket}\0{obj.key}\0{obj.etag}\0{obj.size}"
        return hashlib.sha256(ident.encode()).hexdigest()[:40]

    def open_partial(self, obj: RemoteObject, part_size: int) -> Partial:
        """The in-progress download of `obj`: resumed when an earlier run left one
        for this exact version and chunk size, otherwise started afresh."""
        name = self.partial_name(obj)
        done, _ = self._resumable_chunks(name, obj, part_size)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            if done:
                fd = os.open(name + ".part", flags, dir_fd=self._tmp_fd)
                if os.fstat(fd).st_size != obj.size:
                    os.close(fd)
                    raise FileNotFoundError
            else:
                raise FileNotFoundError
        except FileNotFoundError:
            done = set()
            self._remove(name + ".json")
            self._remove(name + ".part")
            self._check_space(obj)
            fd = self._create(name + ".part", flags)
            try:
                os.ftruncate(fd, obj.size)
            except OSError:
                os.close(fd)
                self._remove(name + ".part")
                raise
        return Partial(self, obj, fd, part_size, done)

    # -- one download per version across processes sharing this store -------------

    def lock_download(self, obj: RemoteObject) -> int | None:
        """Become the one process downloading this version: an exclusive flock
        on tmp/<id>.lock, or None when another process holds it.  The kernel
        drops the lock when its holder dies, so a crash never blocks others."""
        name = self.partial_name(obj) + ".lock"
        while True:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self._tmp_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                # The previous holder unlinks the name when done: make sure the
                # file locked is the one the name still points to.
                if os.stat(name, dir_fd=self._tmp_fd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def unlock_download(self, obj: RemoteObject, fd: int) -> None:
        try:
            os.unlink(self.partial_name(obj) + ".lock", dir_fd=self._tmp_fd)  # while still held
        except FileNotFoundError:
            pass
        os.close(fd)

    def foreign_progress(self, obj: RemoteObject) -> tuple[int, set[int], int] | None:
        """(inode, blocks on disk, block size) of a download of `obj` another
        process records in this store, or None."""
        name = self.partial_name(obj)
        done, _ = self._resumable_chunks(name, obj, None)
        try:
            fd = os.open(name + ".json", _FILE_FLAGS, dir_fd=self._tmp_fd)
            with os.fdopen(fd, "rb") as f:
                state = json.loads(f.read(1 << 24))
            return int(state["ino"]), done, int(state["part_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def open_foreign_part(self, obj: RemoteObject, ino: int) -> int | None:
        """A read-only descriptor of another process's download file, if it is
        still the file `ino` names."""
        try:
            fd = os.open(self.partial_name(obj) + ".part", _FILE_FLAGS, dir_fd=self._tmp_fd)
        except OSError:
            return None
        if os.fstat(fd).st_ino != ino:
            os.close(fd)
            return None
        return fd

    def _check_space(self, obj: RemoteObject) -> None:
        """Refuse a download that cannot fit, before fetching a byte of it."""
        st = os.statvfs(self._tmp_fd)
        free = st.f_bavail * st.f_frsize
        if obj.size > free:
            raise StoreError(f"{obj.uri}: needs {obj.size / 2**20:.1f} MiB but the store "
                             f"{self.root.path} has {free / 2**20:.1f} MiB free", errno.ENOSPC)

    def _create(self, name: str, flags: int) -> int:
        # 0600: a download in progress is nobody else's business, and a
        # world-writable temp file would let anyone change what gets published.
        return os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self._tmp_fd)

    def _resumable_chunks(self, name: str, obj: RemoteObject, part_size: int | None) -> tuple[set[int], int]:
        """Chunks an earlier run recorded for exactly this version (and this
        part size, unless None), and how many bytes they hold."""
        try:
            fd = os.open(name + ".json", _FILE_FLAGS, dir_fd=self._tmp_fd)
            with os.fdopen(fd, "rb") as f:
                state = json.loads(f.read(1 << 24))
            size = int(state.get("part_size") or 0)
            if (state.get("v"), state.get("bucket"), state.get("key"), state.get("etag"),
                    state.get("size")) != (1, obj.bucket, obj.key, obj.etag, obj.size) or size <= 0 \
                    or (part_size is not None and size != part_size):
                return set(), 0
            part = os.stat(name + ".part", dir_fd=self._tmp_fd, follow_symlinks=False)
            if part.st_ino != state.get("ino") or part.st_size != obj.size:
                return set(), 0  # the record is not about this file
            nchunks = max(1, -(-obj.size // size))
            done = {int(i) for i in state.get("done", ()) if 0 <= int(i) < nchunks}
            return done, sum(min(size, obj.size - i * size) for i in done)
        except (OSError, ValueError, TypeError, AttributeError):
            return set(), 0

    def discard(self, partial: Partial) -> None:
        """Remove a download's files (its descriptor stays with the caller) --
        unless a newer download of the same version owns the name by now."""
        try:
            st = os.stat(partial.name + ".part", dir_fd=self._tmp_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if st.st_ino == partial.ino:
            self._remove(partial.name + ".part")
            self._remove(partial.name + ".json")

    def publish(self, partial: Partial, origin: str = "fetch") -> None:
        """Make a complete, verified download the current copy at its key path:
        fsync, date it with the object's Last-Modified, record its identity,
        then rename it into place (and fsync the folder, so the rename sticks)."""
        obj, fd = partial.obj, partial.fd
        if os.fstat(fd).st_size != obj.size:
            raise StoreError(f"{obj.uri}: download has the wrong size, not published")
        os.fsync(fd)
        os.utime(fd, ns=(obj.mtime_ns, obj.mtime_ns))
        # The record first: a user.* attribute needs write permission, which
        # only CAP_DAC_OVERRIDE would grant once the file is read-only.
        self.record(fd, Identity.of(obj, origin))
        os.fchmod(fd, 0o444)
        self._place(partial.name + ".part", obj)
        self._remove(partial.name + ".json")

    def _place(self, tmp_name: str, obj: RemoteObject) -> None:
        """Rename a finished file from tmp/ to its key path, index its content,
        and drop the index entry of the version it replaces if nothing else
        uses it."""
        *dirs, name = obj.key.split("/")
        dfd = self.root.open_dir(dirs, create=True)
        try:
            replaced = self._identity_at(dfd, name)
            try:
                os.rename(tmp_name, name, src_dir_fd=self._tmp_fd, dst_dir_fd=dfd)
            except IsADirectoryError:
                raise StoreError(f"{obj.uri}: a folder stands at {obj.key} in the store") from None
            os.fsync(dfd)
            self._index(dfd, name, obj)
        finally:
            os.close(dfd)
        if replaced is not None and not replaced.matches(obj):
            self._unindex_if_unused(replaced.etag, replaced.size)

    def _identity_at(self, dfd: int, name: str) -> Identity | None:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError:
            return None
        try:
            return self.read_identity(fd)
        finally:
            os.close(fd)

    # -- content index: same bytes under a new path, no download ----------------------

    @staticmethod
    def _content_name(etag: str, size: int) -> str:
        return hashlib.sha256(f"{etag}\0{size}".encode()).hexdigest()[:40]

    def _index(self, dfd: int, name: str, obj: RemoteObject) -> None:
        """Hard-link a published file into .lazyfs/objects under its (ETag, size),
        so another path with the same content can be made from it."""
        if not obj.etag:
            return
        try:
            os.link(name, self._content_name(obj.etag, obj.size), src_dir_fd=dfd,
                    dst_dir_fd=self._objects_fd, follow_symlinks=False)
        except FileExistsError:
            pass  # the same bytes are indexed already
        except OSError as e:
            log.debug("not indexing %s: %s", obj.uri, e.strerror)

    def _unindex_if_unused(self, etag: str, size: int) -> None:
        name = self._content_name(etag, size)
        try:
            if os.stat(name, dir_fd=self._objects_fd, follow_symlinks=False).st_nlink <= 1:
                os.unlink(name, dir_fd=self._objects_fd)
        except OSError:
            pass

    def materialise(self, obj: RemoteObject) -> LocalCopy | None:
        """Make `obj` current from a file with the same (ETag, size) that the
        store already holds under another path (a new model version sharing
        files with the old one): a hard link, or a copy where links fail.
        None when there is no such file."""
        if not obj.etag:
            return None
        name = self._content_name(obj.etag, obj.size)
        try:
            src = os.open(name, _FILE_FLAGS, dir_fd=self._objects_fd)
        except OSError:
            return None
        try:
            ident = self.read_identity(src)
            if ident is None or not ident.matches(obj) or os.fstat(src).st_size != obj.size:
                return None
            tmp = f"{self.partial_name(obj)}.link"
            self._remove(tmp)
            try:
                os.link(name, tmp, src_dir_fd=self._objects_fd, dst_dir_fd=self._tmp_fd,
                        follow_symlinks=False)
            except OSError:
                self._copy_into_tmp(src, tmp, obj, ident.origin)
            self._place(tmp, obj)
        finally:
            os.close(src)
        return self.find_current(obj)

    def _copy_into_tmp(self, src: int, tmp: str, obj: RemoteObject, origin: str) -> None:
        fd = self._create(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            left, off = obj.size, 0
            while left:
                n = os.copy_file_range(src, fd, left, off, off)  # reflinks where the filesystem can
                if n == 0:
                    raise StoreError(f"{obj.uri}: source copy ended early")
                left, off = left - n, off + n
            os.fsync(fd)
            os.utime(fd, ns=(obj.mtime_ns, obj.mtime_ns))
            self.record(fd, Identity.of(obj, origin))  # before 0444, see publish
            os.fchmod(fd, 0o444)
        except BaseException:
            os.close(fd)
            self._remove(tmp)
            raise
        os.close(fd)

    def record(self, fd: int, ident: Identity) -> None:
        """Stamp an open file with the identity it is a copy of."""
        if not self.records:
            return
        try:
            os.setxattr(fd, IDENTITY_XATTR, ident.encode())
        except OSError as e:
            if e.errno not in _NO_XATTR:
                raise
            self.records = False
            log.warning("store %s does not support extended attributes: local copies "
                        "will be checked by size only", self.root.path)

    # -- small helpers -----------------------------------------------------------

    def _remove(self, name: str, dir_fd: int | None = None) -> None:
        try:
            os.unlink(name, dir_fd=self._tmp_fd if dir_fd is None else dir_fd)
        except FileNotFoundError:
            pass

    def _write_small(self, name: str, data: bytes, dir_fd: int | None = None) -> None:
        """Replace a small file atomically (write a sibling, rename over)."""
        dfd = self._tmp_fd if dir_fd is None else dir_fd
        tmp = f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def fsinfo(self) -> os.statvfs_result:
        return os.statvfs(self.root.fd)

    # -- cache budget ---------------------------------------------------------------

    def fetched_files(self) -> list[tuple[str, int, int]]:
        """(key, size, atime) of every file lazyfs fetched (origin "fetch"): the
        only ones the cache budget may evict.  Walks the store: run in a thread."""
        out = []
        for dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=self.root.fd):
            rel = os.path.normpath(dirpath)
            if rel.split("/", 1)[0] == RESERVED_NAME:
                continue
            for name in files:
                try:
                    fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
                except OSError:
                    continue
                try:
                    ident = self.read_identity(fd)
                    st = os.fstat(fd)
                    if ident is not None and ident.origin == "fetch" and stat.S_ISREG(st.st_mode):
                        out.append((name if rel == "." else f"{rel}/{name}", st.st_size, st.st_atime_ns))
                finally:
                    os.close(fd)
        return out

    def evict(self, keys: Iterable[str]) -> int:
        """Remove fetched files (never anything else) from the store; bytes freed."""
        freed = 0
        for key in keys:
            *dirs, name = key.split("/")
            try:
                dfd = self.root.open_dir(dirs)
            except OSError:
                continue
            try:
                fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
                try:
                    ident = self.read_identity(fd)
                    size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
                if ident is None or ident.origin != "fetch":
                    continue
                os.unlink(name, dir_fd=dfd)
                self._unindex_if_unused(ident.etag, ident.size)
                freed += size
            except OSError as e:
                log.warning("could not evict %s from the store: %s", key, e.strerror)
            finally:
                os.close(dfd)
        return freed

    # -- what the store knows without the object store -----------------------------

    @staticmethod
    def _listing_name(bucket: str, prefix: str) -> str:
        return hashlib.sha256(f"{bucket}\0{prefix}".encode()).hexdigest()[:32] + ".json"

    def save_listing(self, bucket: str, prefix: str, objects: Iterable[RemoteObject]) -> None:
        """Keep the last complete listing of a folder, so a restart with the
        object store unreachable still knows what exists (offline start)."""
        rows = [[o.key, o.size, o.etag, o.mtime_ns] for o in objects]
        doc = {"v": 1, "bucket": bucket, "prefix": prefix, "objects": rows}
        dfd = self.root.open_dir([RESERVED_NAME, "listings"], create=True)
        try:
            self._write_small(self._listing_name(bucket, prefix), json.dumps(doc).encode(), dir_fd=dfd)
        finally:
            os.close(dfd)

    def load_listing(self, bucket: str, prefix: str) -> list[RemoteObject] | None:
        try:
            dfd = self.root.open_dir([RESERVED_NAME, "listings"])
        except OSError:
            return None
        try:
            fd = os.open(self._listing_name(bucket, prefix), _FILE_FLAGS, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                doc = json.load(f)
            if doc.get("v") != 1 or doc.get("bucket") != bucket or doc.get("prefix") != prefix:
                return None
            return [RemoteObject(bucket, str(k), int(size), str(etag), int(mtime))
                    for k, size, etag, mtime in doc["objects"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        finally:
            os.close(dfd)

    def walk_local(self, bucket: str, prefix: str) -> Iterator[tuple[RemoteObject, str]]:
        """Regular files under `prefix` in the store and the prebaked layers, as
        objects (their recorded identity, or just size and mtime) with the
        layer's label.  Symlinks are not followed.  For offline start only: it
        costs a directory walk."""
        seen: set[str] = set()
        parts = [p for p in prefix.strip("/").split("/") if p]
        for layer in self.layers():
            try:
                top = layer.open_dir(parts)
            except OSError:
                continue
            try:
                for dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=top):
                    rel = os.path.normpath(dirpath)
                    if rel.split("/", 1)[0] == RESERVED_NAME:
                        continue
                    for name in files:
                        key = "/".join(parts + ([] if rel == "." else [rel]) + [name])
                        obj = self._local_object(dfd, name, key, bucket)
                        if obj is not None and key not in seen:
                            seen.add(key)
                            yield obj, layer.label
            finally:
                os.close(top)

    def _local_object(self, dfd: int, name: str, key: str, bucket: str) -> RemoteObject | None:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            ident = self.read_identity(fd)
            if ident is not None and ident.size == st.st_size:
                return RemoteObject(ident.bucket, key, ident.size, ident.etag, ident.mtime_ns)
            return RemoteObject(bucket, key, st.st_size, "", st.st_mtime_ns)
        finally:
            os.close(fd)
