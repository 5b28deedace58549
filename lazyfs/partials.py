"""Downloads in progress on disk, in the store's private `.lazyfs/tmp/`:

    <id>.part    a sparse file of the object's full size, written in place
    <id>.json    the resume record: which blocks are durably on disk
    <id>.lock    flocked by the one process downloading this version
    <id>.want    byte ranges readers in other processes wait for, a line
                 each, appended by them and read by the downloading process
                 (coop.py), so their reads jump its queue as its own do

    publish.lock flocked while a publish or an eviction looks at a key path
                 and renames over it or unlinks it

`<id>` names one object *version*, so two versions of a key downloading at
once (an old handle and a new open) never share a file.  The resume record
names the sparse file's inode: it can then only ever describe the file it was
written for, even if a late write of it races the removal of a failed download
and a fresh one under the same name (its format: resume.py).

All functions block: call them from worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from lazyfs import exhausted, storeroom, wording
from lazyfs.errors import StoreError
from lazyfs.layer import FILE_FLAGS, flock_held, if_inode, inode_at, remove, remove_if_same, write_small
from lazyfs.namespace import RemoteObject
from lazyfs.resume import RECORD_MAX, Record, nblocks, parse_record, record_of

# sweep(): what a download of a version nobody wants left behind goes after
# this long untouched.  An hour: longer than any pause of a live download
# between two resume records, which also holds its lock.
SWEEP_AGE_S = 3600.0
_DOWNLOAD_FILE = re.compile(r"^([0-9a-f]{40})\.(part|json|lock|link|want)$")
# wants(): the most of a want file read at once (a line is about 25 bytes).
_WANTS_READ_MAX = 64 * 1024
_PUBLISH_LOCK = "publish.lock"


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
        self.not_kept = ""  # why a publish kept nothing (Store.publish), for the download's line
        self.name = files.name(obj)
        st = os.fstat(fd)
        self.ino = st.st_ino
        # Its blocks all allocated (storewrite.preallocate): writers of
        # separate bytes need not take turns.
        self.preallocated = st.st_blocks * 512 >= obj.size > 0
        # `done` as one byte per block (1: on disk), made here in the store
        # thread that opens the file: a resumed 100 GiB download has hundreds
        # of thousands of scattered blocks, tens of ms of looping on the trio
        # thread (issue 11 #13); Download.attach translates it in C.
        self.done_map = bytearray(self.nblocks)
        for i in done:
            self.done_map[i] = 1

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
        try:
            write_small(self.files.tmp_fd, self.name + ".json", record_of(self.obj, self.block_size, self.ino, done))
        except OSError as e:  # its file is new each time: ENOSPC for want of an inode says so
            raise OSError(e.errno, exhausted.no_room(e, self.files.tmp_fd)) from None
        # Published as this ran (renamed out of tmp/, its record removed before
        # this one was written, by a save already under way): not left behind.
        if inode_at(self.files.tmp_fd, self.name + ".part") != self.ino:
            remove(self.files.tmp_fd, self.name + ".json")


class PartialFiles:
    """The `.lazyfs/tmp/` folder of one store, by descriptor."""

    def __init__(self, tmp_fd: int, store_path: str) -> None:
        self.tmp_fd = tmp_fd
        self.store_path = store_path
        # Files of failed downloads whose removal is pending (it waits for the
        # download's threads): (name, inode).  An open in that window must
        # start afresh, not resume a file about to be unlinked under it.
        # Added on the trio thread, read and removed in worker threads: single
        # set operations, atomic under the GIL.
        self._condemned: set[tuple[str, int]] = set()
        # Held while a new download file is checked, made and given its blocks (storeroom.py).
        self._admitting = threading.Lock()

    @staticmethod
    def name(obj: RemoteObject) -> str:
        ident = "\0".join(str(part) for part in obj.version)
        return hashlib.sha256(ident.encode()).hexdigest()[:40]

    def open(self, obj: RemoteObject, block_size: int) -> Partial:
        """The in-progress download of `obj`: resumed when an earlier run left one
        for this exact version and block size, otherwise started afresh."""
        name = self.name(obj)
        record = self._record(name, obj)
        if record is not None and record.block_size == block_size and (name, record.ino) not in self._condemned:
            fd = self._reopen(name + ".part", record.ino)
            if fd is not None:
                try:
                    with self._admitting:  # its blocks still missing taken, or refused: its files kept
                        storeroom.resume(self.tmp_fd, fd, obj, self.store_path, block_size, record.runs)
                except BaseException:
                    os.close(fd)
                    raise
                return self._partial(obj, fd, block_size, set(record.blocks()))
        remove(self.tmp_fd, name + ".json")
        remove(self.tmp_fd, name + ".part")
        with self._admitting:  # one at a time in this store (storeroom.py)
            free = storeroom.check(self.tmp_fd, obj, self.store_path)
            fd = self._create(name + ".part", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, obj.size)
                if free is not None:  # it fits: a filesystem may fill itself before it says it cannot
                    storeroom.take(self.tmp_fd, fd, obj, self.store_path)
            except BaseException:
                os.close(fd)
                remove(self.tmp_fd, name + ".part")
                raise
        return self._partial(obj, fd, block_size, set())

    def _partial(self, obj: RemoteObject, fd: int, block_size: int, done: set[int]) -> Partial:
        try:
            return Partial(self, obj, fd, block_size, done)
        except BaseException:
            os.close(fd)
            raise

    def _reopen(self, name: str, ino: int) -> int | None:
        """The sparse file a resume record describes, read-write: None if the
        name holds another file by now, or one we may not write (sealed
        read-only by a publish that was cut short: only CAP_DAC_OVERRIDE could
        write it, and a download never needs that)."""
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.tmp_fd)
        except (FileNotFoundError, PermissionError):
            return None
        return if_inode(fd, ino)

    def resumable_bytes(self, obj: RemoteObject) -> int:
        """Bytes of `obj` an interrupted download left on disk (whatever its block size)."""
        record = self._record(self.name(obj), obj)
        return 0 if record is None else record.nbytes(obj.size)

    def _record(self, name: str, obj: RemoteObject) -> Record | None:
        """The resume record an earlier run left for exactly this version, if it
        still describes the sparse file on disk."""
        try:
            record = parse_record(self._load(name), obj)
            if record is None:
                return None
            part = os.stat(name + ".part", dir_fd=self.tmp_fd, follow_symlinks=False)
            if part.st_ino != record.ino or part.st_size != obj.size:
                return None  # the record is not about this file
            return record
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def _load(self, name: str) -> dict[str, Any]:
        fd = os.open(name + ".json", FILE_FLAGS, dir_fd=self.tmp_fd)
        with os.fdopen(fd, "rb") as f:
            state = json.loads(f.read(RECORD_MAX))
        if not isinstance(state, dict):
            raise ValueError("not a resume record")
        return state

    def condemn(self, partial: Partial) -> None:
        """Say now that `partial`'s files will be discarded: no open resumes them
        from here on, even before `discard` gets to run."""
        self._condemned.add((partial.name, partial.ino))

    def discard(self, partial: Partial) -> None:
        """Remove a download's files (its descriptor stays with the caller) --
        unless a newer download of the same version owns the name by now."""
        ino = inode_at(self.tmp_fd, partial.name + ".part")
        self._condemned.discard((partial.name, partial.ino))
        if ino == partial.ino:
            remove(self.tmp_fd, partial.name + ".part")
            remove(self.tmp_fd, partial.name + ".json")
            remove(self.tmp_fd, partial.name + ".want")

    def _create(self, name: str, flags: int) -> int:
        # 0600: a download in progress is nobody else's business, and a
        # world-writable temp file would let anyone change what gets published.
        return os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self.tmp_fd)

    def remove(self, name: str) -> None:
        remove(self.tmp_fd, name)

    def forget_record(self, partial: Partial) -> None:
        """Drop the resume record (and the wants) of a download that was published."""
        remove(self.tmp_fd, partial.name + ".json")
        remove(self.tmp_fd, partial.name + ".want")

    def create_sibling(self, name: str) -> int:
        """A new private file in tmp/ (for a copy being made), read-write."""
        remove(self.tmp_fd, name)
        return self._create(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)

    # -- one download per version across processes sharing this store -------------

    def lock(self, obj: RemoteObject) -> int | None:
        """Become the one process downloading this version: an exclusive flock
        on tmp/<id>.lock, or None when another process holds it.  The kernel
        drops the lock when its holder dies, so a crash never blocks others."""
        try:
            return self._lock(self.name(obj) + ".lock")
        except OSError as e:  # EMFILE near the descriptor limit, ENOSPC for want of an inode: the file it was for
            raise StoreError(f"{wording.quoted(obj.uri)}: cannot lock the download in the store: "
                             f"{exhausted.no_room(e, self.tmp_fd)}",
                             e.errno or errno.EIO) from None

    def _lock(self, name: str) -> int | None:
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
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def unlock(self, obj: RemoteObject, fd: int) -> None:
        self._unlock(self.name(obj) + ".lock", fd)

    def drop_lock(self, obj: RemoteObject, fd: int) -> None:
        """`unlock` when no thread can be had to run it (threads.run_else): only the descriptor's
        close, which drops the flock; the name is left to the next lock of it, or the sweep."""
        os.close(fd)

    def downloading(self, obj: RemoteObject) -> bool:
        """Does some process (this one included) download this version right
        now?  A look at its lock that never takes it from anyone (layer.flock_held)."""
        return flock_held(self.tmp_fd, self.name(obj) + ".lock")

    def _unlock(self, name: str, fd: int) -> None:
        try:
            remove_if_same(self.tmp_fd, name, fd)  # while still held (tmp/ made again since: another's)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def publish_lock(self) -> Iterator[None]:
        """Held while a key path is looked at and then renamed over or unlinked
        (publish, eviction), by every thread and process on this store: what
        was judged is then what is acted on.  Held for a rename or an unlink,
        never across I/O of a file's content."""
        fd = os.open(_PUBLISH_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.tmp_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # drops the lock

    def foreign_progress(self, obj: RemoteObject) -> ForeignProgress | None:
        """The resume record of a download of `obj` another process runs in this store."""
        name = self.name(obj)
        try:
            record = parse_record(self._load(name), obj)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if record is None:
            return None
        on_disk = self._record(name, obj)  # the record still describes the sparse file
        done = on_disk.blocks() if on_disk is not None and on_disk.block_size == record.block_size else frozenset()
        return ForeignProgress(record.ino, done, record.block_size)

    def want(self, obj: RemoteObject, start: int, end: int) -> None:
        """Ask the process downloading `obj` for bytes [start, end), which a
        reader here waits for: a line appended to tmp/<id>.want (one write
        with O_APPEND: lines of several followers never interleave)."""
        # O_NONBLOCK: a FIFO planted under the name fails the open, never hangs it.
        fd = os.open(self.name(obj) + ".want",
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     0o600, dir_fd=self.tmp_fd)
        try:
            os.write(fd, b"%d %d\n" % (start, end))
        finally:
            os.close(fd)

    def wants(self, obj: RemoteObject, offset: int) -> tuple[int, list[tuple[int, int]]]:
        """The byte ranges asked for (want()) from `offset` of the want file on,
        and where to read next time.  Only whole lines count (a follower may
        be writing one); a file shorter than `offset` is a new one, read from
        its start; a line that is not two numbers is skipped."""
        try:
            fd = os.open(self.name(obj) + ".want", FILE_FLAGS, dir_fd=self.tmp_fd)
        except FileNotFoundError:
            return 0, []
        try:
            if os.fstat(fd).st_size < offset:
                offset = 0
            data = os.pread(fd, _WANTS_READ_MAX, offset)
        finally:
            os.close(fd)
        whole = data.rfind(b"\n") + 1
        if whole == 0 and len(data) == _WANTS_READ_MAX:
            return offset + len(data), []  # no line in all that: not ours, skip it
        ranges = []
        for line in data[:whole].splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
                ranges.append((int(fields[0]), int(fields[1])))
        return offset + whole, ranges

    def open_foreign(self, obj: RemoteObject, ino: int) -> int | None:
        """A read-only descriptor of another process's download file, if it is
        still the file `ino` names."""
        try:
            fd = os.open(self.name(obj) + ".part", FILE_FLAGS, dir_fd=self.tmp_fd)
        except OSError:
            return None
        return if_inode(fd, ino)

    # -- leftovers ---------------------------------------------------------------------------

    def sweep(self, keep: Iterable[RemoteObject], older_than: float = SWEEP_AGE_S) -> int:
        """Remove what downloads of versions not in `keep` left in tmp/ (sparse
        file, resume record, lock, link) once untouched for `older_than`
        seconds, the same of versions in `keep` with no sparse file left
        (nothing to resume), and leftovers of interrupted small writes.  A download some
        process still runs holds its lock and is left alone; so is every
        version in `keep`, which must come from a whole current listing (not
        one that failed).  Bytes freed."""
        wanted = {self.name(o) for o in keep}
        cutoff = time.time() - older_than
        groups: dict[str, list[str]] = {}
        freed = 0
        for name in os.listdir(self.tmp_fd):
            m = _DOWNLOAD_FILE.match(name)
            if m is not None:
                groups.setdefault(m.group(1), []).append(name)
            elif name.endswith(".tmp") and self._untouched_since(name, cutoff):
                freed += self._remove_counted(name)  # from write_small, cut short by a crash
        for ident, names in groups.items():
            if ident in wanted and any(n.endswith(".part") for n in names):  # kept for the next open to resume
                freed += sum(self._remove_counted(n) for n in names  # appended by a follower after the publish
                             if n.endswith(".want") and self._untouched_since(n, cutoff))
            elif all(self._untouched_since(n, cutoff) for n in names):  # not current, or nothing to resume:
                freed += self._remove_download(ident, names)  # (a record left by a kill as its file was published)
        return freed

    def _untouched_since(self, name: str, cutoff: float) -> bool:
        # ctime: every write, chmod or utime moves it (an mtime can be set back).
        try:
            return os.stat(name, dir_fd=self.tmp_fd, follow_symlinks=False).st_ctime < cutoff
        except FileNotFoundError:
            return False

    def _remove_download(self, ident: str, names: list[str]) -> int:
        lock = self._lock(ident + ".lock")
        if lock is None:
            return 0  # some process downloads it right now
        try:
            return sum(self._remove_counted(n) for n in names if not n.endswith(".lock"))
        finally:
            self._unlock(ident + ".lock", lock)

    def _remove_counted(self, name: str) -> int:
        try:
            st = os.stat(name, dir_fd=self.tmp_fd, follow_symlinks=False)
            os.unlink(name, dir_fd=self.tmp_fd)
        except FileNotFoundError:
            return 0
        return st.st_blocks * 512 if st.st_nlink <= 1 else 0

