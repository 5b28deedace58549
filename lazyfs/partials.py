"""Downloads in progress on disk, in the store's private `.lazyfs/tmp/`:

    <id>.part    a sparse file of the object's full size, written in place
    <id>.json    the resume record: which blocks are durably on disk
    <id>.lock    flocked by the one process downloading this version

`<id>` names one object *version*, so two versions of a key downloading at
once (an old handle and a new open) never share a file.  The resume record
names the sparse file's inode: it can then only ever describe the file it was
written for, even if a late write of it races the removal of a failed download
and a fresh one under the same name.

All functions block: call them from worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable

from lazyfs.errors import StoreError
from lazyfs.layer import FILE_FLAGS, remove, write_small
from lazyfs.namespace import RemoteObject

_RECORD_MAX = 1 << 24


def nblocks(size: int, block_size: int) -> int:
    return max(1, -(-size // block_size))


@dataclass(frozen=True, slots=True)
class ForeignProgress:
    """What another process's resume record says about its download."""

    ino: int  # of the sparse file the record describes
    blocks: frozenset[int]
    block_size: int


class Partial:
    """One download's sparse file (open read-write) and its resume record."""

    def __init__(self, files: PartialFiles, obj: RemoteObject, fd: int, block_size: int,
                 done: set[int]) -> None:
        self.files = files
        self.obj = obj
        self.fd = fd
        self.block_size = block_size
        self.done = done  # blocks durably on disk, as last recorded or resumed
        self.name = files.name(obj)
        self.ino = os.fstat(fd).st_ino

    @property
    def nblocks(self) -> int:
        return nblocks(self.obj.size, self.block_size)

    def close(self) -> None:
        os.close(self.fd)

    def save_state(self, done: Iterable[int]) -> None:
        """Make the blocks in `done` durable, then record them (in that order, so
        a block is never recorded before its bytes would survive a power loss).
        `done` is a snapshot: the caller's set may change while this runs."""
        os.fdatasync(self.fd)
        state = {"v": 1, "bucket": self.obj.bucket, "key": self.obj.key, "etag": self.obj.etag,
                 "size": self.obj.size, "block_size": self.block_size, "ino": self.ino,
                 "done": sorted(done)}
        write_small(self.files.tmp_fd, self.name + ".json", json.dumps(state).encode())


class PartialFiles:
    """The `.lazyfs/tmp/` folder of one store, by descriptor."""

    def __init__(self, tmp_fd: int, store_path: str) -> None:
        self.tmp_fd = tmp_fd
        self.store_path = store_path

    @staticmethod
    def name(obj: RemoteObject) -> str:
        ident = "\0".join(str(part) for part in obj.version)
        return hashlib.sha256(ident.encode()).hexdigest()[:40]

    def open(self, obj: RemoteObject, block_size: int) -> Partial:
        """The in-progress download of `obj`: resumed when an earlier run left one
        for this exact version and block size, otherwise started afresh."""
        name = self.name(obj)
        done = self._resumable(name, obj, block_size)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if done:
            try:
                fd = os.open(name + ".part", flags, dir_fd=self.tmp_fd)
            except FileNotFoundError:
                fd = -1
            if fd >= 0 and os.fstat(fd).st_size == obj.size:
                return Partial(self, obj, fd, block_size, done)
            if fd >= 0:
                os.close(fd)
        remove(self.tmp_fd, name + ".json")
        remove(self.tmp_fd, name + ".part")
        self._check_space(obj)
        fd = self._create(name + ".part", flags)
        try:
            os.ftruncate(fd, obj.size)
            return Partial(self, obj, fd, block_size, set())
        except BaseException:
            os.close(fd)
            remove(self.tmp_fd, name + ".part")
            raise

    def resumable_bytes(self, obj: RemoteObject) -> int:
        """Bytes of `obj` an interrupted download left on disk (whatever its block size)."""
        record = self._record(self.name(obj), obj)
        if record is None:
            return 0
        size, done = record
        return sum(min(size, obj.size - i * size) for i in done)

    def _resumable(self, name: str, obj: RemoteObject, block_size: int) -> set[int]:
        record = self._record(name, obj)
        if record is None or record[0] != block_size:
            return set()
        return set(record[1])

    def _record(self, name: str, obj: RemoteObject) -> tuple[int, frozenset[int]] | None:
        """(block size, blocks done) an earlier run recorded for exactly this
        version, if the record still describes the sparse file on disk."""
        try:
            state = self._load(name)
            size = int(state.get("block_size") or state.get("part_size") or 0)  # "part_size": older records
            if (state.get("v"), state.get("bucket"), state.get("key"), state.get("etag"),
                    state.get("size")) != (1, *obj.version) or size <= 0:
                return None
            part = os.stat(name + ".part", dir_fd=self.tmp_fd, follow_symlinks=False)
            if part.st_ino != state.get("ino") or part.st_size != obj.size:
                return None  # the record is not about this file
            n = nblocks(obj.size, size)
            return size, frozenset(int(i) for i in state.get("done", ()) if 0 <= int(i) < n)
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def _load(self, name: str) -> dict[str, Any]:
        fd = os.open(name + ".json", FILE_FLAGS, dir_fd=self.tmp_fd)
        with os.fdopen(fd, "rb") as f:
            state = json.loads(f.read(_RECORD_MAX))
        if not isinstance(state, dict):
            raise ValueError("not a resume record")
        return state

    def discard(self, partial: Partial) -> None:
        """Remove a download's files (its descriptor stays with the caller) --
        unless a newer download of the same version owns the name by now."""
        try:
            st = os.stat(partial.name + ".part", dir_fd=self.tmp_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if st.st_ino == partial.ino:
            remove(self.tmp_fd, partial.name + ".part")
            remove(self.tmp_fd, partial.name + ".json")

    def _check_space(self, obj: RemoteObject) -> None:
        """Refuse a download that cannot fit, before fetching a byte of it."""
        st = os.statvfs(self.tmp_fd)
        free = st.f_bavail * st.f_frsize
        if obj.size > free:
            raise StoreError(f"{obj.uri}: needs {obj.size / 2**20:.1f} MiB but the store "
                             f"{self.store_path} has {free / 2**20:.1f} MiB free", errno.ENOSPC)

    def _create(self, name: str, flags: int) -> int:
        # 0600: a download in progress is nobody else's business, and a
        # world-writable temp file would let anyone change what gets published.
        return os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self.tmp_fd)

    def remove(self, name: str) -> None:
        remove(self.tmp_fd, name)

    def forget_record(self, partial: Partial) -> None:
        """Drop the resume record of a download that was published."""
        remove(self.tmp_fd, partial.name + ".json")

    def create_sibling(self, name: str) -> int:
        """A new private file in tmp/ (for a copy being made), read-write."""
        remove(self.tmp_fd, name)
        return self._create(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)

    # -- one download per version across processes sharing this store -------------

    def lock(self, obj: RemoteObject) -> int | None:
        """Become the one process downloading this version: an exclusive flock
        on tmp/<id>.lock, or None when another process holds it.  The kernel
        drops the lock when its holder dies, so a crash never blocks others."""
        name = self.name(obj) + ".lock"
        while True:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self.tmp_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                # The previous holder unlinks the name when done: make sure the
                # file locked is the one the name still points to.
                if os.stat(name, dir_fd=self.tmp_fd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def unlock(self, obj: RemoteObject, fd: int) -> None:
        remove(self.tmp_fd, self.name(obj) + ".lock")  # while still held
        os.close(fd)

    def foreign_progress(self, obj: RemoteObject) -> ForeignProgress | None:
        """The resume record of a download of `obj` another process runs in this store."""
        name = self.name(obj)
        try:
            state = self._load(name)
            ino = int(state["ino"])
            size = int(state.get("block_size") or state.get("part_size") or 0)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        record = self._record(name, obj)
        done = record[1] if record is not None and record[0] == size else frozenset()
        return ForeignProgress(ino, done, max(1, size))

    def open_foreign(self, obj: RemoteObject, ino: int) -> int | None:
        """A read-only descriptor of another process's download file, if it is
        still the file `ino` names."""
        try:
            fd = os.open(self.name(obj) + ".part", FILE_FLAGS, dir_fd=self.tmp_fd)
        except OSError:
            return None
        if os.fstat(fd).st_ino != ino:
            os.close(fd)
            return None
        return fd
