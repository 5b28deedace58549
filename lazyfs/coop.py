"""Several lazyfs processes on one store (two pods sharing a node's cache, a
mount and a `lazyfs bake`): each version is fetched once, by whichever
process takes its download lock first (partials.PartialFiles.lock).

The others follow that download through the store: the owner records the
blocks it has made durable (at most a second behind; 0.2 s while we ask for
bytes), so a reader here is served from the owner's sparse file as the bytes
land, and from the published file once it is done.  The bytes a reader here
waits for are asked for (a want file beside the download), and the owner
fetches them next, as for a reader of its own.  If the owner dies or gives
up, its lock is released by the kernel and the next poll here takes the
download over, resuming from the blocks on disk (decided under that lock: an
owner that published, its lock given back and the file evicted by its budget
at once, is no dead owner).  A file the owner published is served on from the
file mapped here, evicted or not (lastbytes.sealed).  Files are only ever
written by the lock's holder, so nothing is written twice or torn.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

import trio

from lazyfs.download import Download
from lazyfs.errors import NoThread, RemoteUnavailable, ShuttingDown, again
from lazyfs.filemap import FileMap, PageBudget
from lazyfs.filestate import PrebakedAccept
from lazyfs.gaveup import GaveUp
from lazyfs.lastbytes import sealed, verify_deadline
from lazyfs.namespace import RemoteObject
from lazyfs.store import LocalCopy, Store
from lazyfs.threads import run_else, run_sync
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

POLL_S = 0.2
# How often the owner looks at the want files of other processes' readers
# (hear_wants), while it downloads anything.
WANTS_POLL_S = 0.1
# A follower waiting for bytes asks the owner for them this often (_want).
WANT_AGAIN_S = 2.0

# Start our own download of the version, holding the store lock we just took
# (and whether nobody reads it yet).
TakeOver = Callable[[RemoteObject, int, bool], Awaitable[Download]]


@dataclass(slots=True)
class Published:
    copy: LocalCopy
    fmap: FileMap


@dataclass(slots=True)
class Sealed:
    """The file we mapped is verified and was published (and maybe evicted
    since: its bytes stay readable while we hold it): serve on from it."""


@dataclass(slots=True)
class Unowned:
    """The owner is gone: we took its lock.  `left`: its resume record, the
    bytes to continue from (none: it died before one, or it published and
    the file was evicted since)."""

    lock_fd: int
    left: bool


@dataclass(slots=True)
class Running:
    """The owner's resume record (ino -1: none yet), and its file opened if it
    is not the one already mapped."""

    ino: int
    blocks: frozenset[int]
    block_size: int
    fd: int = -1
    fmap: FileMap | None = None


class ForeignDownload:
    """Another process's download of one version, as readers here see it (a
    transfer.Transfer)."""

    def __init__(self, obj: RemoteObject, store: Store, pages: PageBudget, io: trio.CapacityLimiter,
                 read_deadline: float, take_over: TakeOver,
                 on_finished: Callable[[ForeignDownload], None],
                 drop_pages: Callable[[RemoteObject], None], accept: PrebakedAccept | None = None) -> None:
        self.obj = obj
        # What the probe of the open asked of an unrecorded copy (--verify
        # etag, pinned): the one it rejected is at the key path until the
        # owner publishes over it, and must not pass for that publication.
        self._accept = accept
        self._store = store
        self._pages = pages
        self._io = io
        self._read_deadline = read_deadline
        self._take_over_with = take_over
        self._on_finished = on_finished
        # Starts dropping the kernel's cached pages of this version (they are
        # wrong); it cannot wait for the drop, which waits for our readers.
        self._drop_pages = drop_pages
        self.readers = 0
        self.served = 0
        self.background = True
        self.started = time.monotonic()
        self.complete = False
        self.error: BaseException | None = None
        self.finished = trio.Event()
        self.delegate: Download | None = None  # after a takeover
        self._local: LocalCopy | None = None
        self._local_map: FileMap | None = None
        self._part_fd = -1
        self._part_map: FileMap | None = None
        self._part_ino = -1  # the owner's file we mapped; only its records are trusted
        self._done: frozenset[int] = frozenset()
        self._block = 1
        self._changed = trio.Event()
        # Bytes our readers waited a deadline for in vain; any new block of the owner's clears them (gaveup.py).
        self._gave_up = GaveUp(read_deadline)
        self._stopped = False  # the mount is stopping: no more polls, no take-over
        self._attempt = 1  # the owner's files we followed: it starts over after bad bytes (lastbytes.py)

    @property
    def generation(self) -> int:
        # A take-over resumes the file we followed: its attempts count on from ours.
        return self._attempt + (self.delegate.generation - 1 if self.delegate is not None else 0)

    # -- the Transfer surface ------------------------------------------------------

    @property
    def fmap(self) -> FileMap:
        if self.delegate is not None:
            return self.delegate.fmap
        if self._local_map is not None:
            return self._local_map
        assert self._part_map is not None, "read before wait_range"
        return self._part_map

    @property
    def fetched_bytes(self) -> int:
        if self.delegate is not None:
            return self.delegate.fetched_bytes
        if self.complete:
            return self.obj.size
        return sum(min(self._block, self.obj.size - i * self._block) for i in self._done)

    def covered(self, start: int, end: int) -> bool:
        if self.delegate is not None:
            return self.delegate.covered(start, end)
        if self.complete or end <= start:
            return True
        if self._part_map is None or self._all_recorded:
            return False  # every block on disk: held until the owner has verified and published it (lastbytes.py)
        return all(i in self._done for i in range(start // self._block, (end - 1) // self._block + 1))

    @property
    def _all_recorded(self) -> bool:
        return len(self._done) * self._block >= self.obj.size > 0

    async def wait_range(self, start: int, end: int) -> None:
        end = min(end, self.obj.size)
        deadline = trio.current_time() + self._read_deadline
        asked: float | None = None
        verifying = False
        while True:
            if self.delegate is not None:
                await self.delegate.wait_range(start, end)
                return
            if self.error is not None:
                raise again(self.error)
            if self.covered(start, end):
                return
            now = trio.current_time()
            if self._all_recorded and not verifying:  # the wait is the owner's verification's now
                deadline, verifying = max(deadline, now + verify_deadline(self.obj, 0.0)), True
            if now >= deadline:
                self._gave_up.mark(start, end, now)
                raise RemoteUnavailable(f"{quoted(self.obj.uri)}: another lazyfs process is downloading it and "
                                        f"bytes {start}-{end} did not arrive within {self._read_deadline:g} s",
                                        bucket=self.obj.bucket, key=self.obj.key)
            if asked is None or now - asked >= WANT_AGAIN_S:
                # Ask the owner (again after a while: a process that took a
                # dead owner's download over may have started a fresh want file).
                first, asked = asked is None, now
                await self._want(start, end)
                if first:  # the kernel's retry of a read that just gave up on these bytes fails now
                    self._gave_up.refuse(self.obj, start, end, now)
            with trio.move_on_at(min(deadline, asked + WANT_AGAIN_S)):
                await self._changed.wait()

    async def wait_drained(self) -> None:
        # The owner's requests are not visible from here: wait for the end,
        # unless this process takes over and runs the download itself.
        while not self.finished.is_set():
            if self.delegate is not None:
                await self.delegate.wait_drained()
                return
            await self._changed.wait()

    async def _want(self, start: int, end: int) -> None:
        """Ask the owner for bytes [start, end) (its Fetcher hears it within
        WANTS_POLL_S and fetches them next): otherwise they come when its sweep
        gets there, which in a large file can be after our read deadline."""
        try:
            await run_sync(self._store.partials.want, self.obj, start, end, limiter=self._io)
        except NoThread:
            pass  # (threads.py said it) the owner's sweep still brings them, later
        except OSError as e:  # the owner's sweep still brings them, later
            log.debug("%s: could not ask the downloading process for bytes %d-%d: %s", quoted(self.obj.uri), start, end,
                      e.strerror)

    def add_reader(self, served: bool = True) -> None:
        self.readers += 1
        self.served += served
        if self.delegate is not None:
            self.delegate.add_reader(served)

    def drop_reader(self, served: bool = True) -> None:
        self.readers -= 1
        self.served -= served
        if self.delegate is not None:
            self.delegate.drop_reader(served)
        self._maybe_close()

    def stop(self) -> None:
        """The mount is stopping: readers still waiting get EIO now, not at
        their read deadline (the main loop ends once every request is answered)."""
        if self.delegate is None and not self.finished.is_set():
            self._stopped = True
            self.error = self.error or ShuttingDown(f"{quoted(self.obj.uri)}: lazyfs is shutting down",
                                                    bucket=self.obj.bucket, key=self.obj.key)
            self._wake()

    # -- following the owner ---------------------------------------------------------

    async def follow(self) -> None:
        """Poll the store until the owner publishes, or take over if it is gone."""
        log.info("%s is being downloaded by another lazyfs process on this store; following it",
                 quoted(self.obj.uri))
        try:
            while not self.finished.is_set() and not self._stopped:
                seen = await run_sync(self._poll, self._part_ino, self._part_fd, limiter=self._io)
                if isinstance(seen, Published):
                    self._local, self._local_map = seen.copy, seen.fmap
                    self.complete = True
                    break
                if isinstance(seen, Sealed):  # the file we mapped, verified: served until the last reader leaves
                    self.complete = True
                    break
                if isinstance(seen, Unowned):  # we hold the lock now
                    await self._take_over(seen.lock_fd, seen.left)
                    break
                self._follow(seen)
                self._wake()
                await trio.sleep(POLL_S)
        except Exception as e:  # the store failed us: readers get the error, not a hang
            self.error = e
        finally:
            self.finished.set()
            self._wake()
            self._on_finished(self)
            self._maybe_close()

    def _follow(self, seen: Running) -> None:
        """Trust only a record of the file we have mapped.  When the owner
        discarded its file (bad bytes, a full disk) and started another, drop
        the old mapping and the pages the kernel cached from it.  (One it
        published is never taken for that: _poll sees it sealed first.)"""
        if self._part_map is not None and seen.ino != self._part_ino:
            log.info("%s: the other process started its download over; following the new file", quoted(self.obj.uri))
            self._attempt += 1
            self._close_part()
            self._drop_pages(self.obj)
        if self._part_map is None and seen.fmap is not None:
            self._part_fd, self._part_map, self._part_ino = seen.fd, seen.fmap, seen.ino
        elif seen.fmap is not None:  # mapped meanwhile by an earlier poll: this one is spare
            seen.fmap.close()
            os.close(seen.fd)
        if self._part_map is not None and seen.ino == self._part_ino:
            if self._gave_up and not seen.blocks <= self._done:  # bytes arrived: readers wait again
                self._gave_up.clear()
            self._done, self._block = seen.blocks, seen.block_size
        else:
            self._done = frozenset()

    def _poll(self, mapped_ino: int, mapped_fd: int) -> Published | Sealed | Unowned | Running:
        """Worker thread: what the store says now.  Opens what the trio side
        may adopt; changes nothing of this object (docs/concurrency.md).
        The file we mapped (`mapped_fd`) is looked at whenever the owner's
        file is no longer it: published, then evicted by the owner's budget
        and even downloaded afresh within one poll, it is still the verified
        file, never a dead owner's or one started over after bad bytes."""
        copy = self._store.find_current(self.obj, self._accept)
        if copy is not None:
            return Published(copy, FileMap(copy.fd, self.obj.size, self._pages))
        lock = self._store.partials.lock(self.obj)
        if lock is not None:
            return self._unowned(lock, mapped_fd)
        progress = self._store.partials.foreign_progress(self.obj)
        if (progress is None or progress.ino != mapped_ino) and mapped_fd >= 0 and sealed(mapped_fd, self.obj):
            return Sealed()
        if progress is None:
            return Running(-1, frozenset(), 1)
        running = Running(progress.ino, progress.blocks, progress.block_size)
        if progress.ino != mapped_ino:
            fd = self._store.partials.open_foreign(self.obj, progress.ino)
            if fd is not None:
                running.fd, running.fmap = fd, FileMap(fd, self.obj.size, self._pages)
        return running

    def _unowned(self, lock_fd: int, mapped_fd: int) -> Published | Sealed | Unowned:
        """Worker thread, holding the lock nobody held: the owner died, or it
        published (its last look above came just before) and gave the lock
        back.  Decided under the lock, which no owner can take meanwhile."""
        try:
            if mapped_fd >= 0 and sealed(mapped_fd, self.obj):
                seen: Published | Sealed | Unowned = Sealed()
            elif (copy := self._store.find_current(self.obj, self._accept)) is not None:
                seen = Published(copy, FileMap(copy.fd, self.obj.size, self._pages))
            else:
                return Unowned(lock_fd, self._store.partials.foreign_progress(self.obj) is not None)
        except BaseException:
            self._store.partials.unlock(self.obj, lock_fd)
            raise
        self._store.partials.unlock(self.obj, lock_fd)
        return seen

    async def _take_over(self, lock_fd: int, left: bool) -> None:
        if left:
            log.info("%s: the process downloading it is gone; continuing its download here", quoted(self.obj.uri))
        else:
            log.info("%s: the other process's download of it is over and left nothing to continue (that process "
                     "ended, or published the file and then evicted it); downloading it here", quoted(self.obj.uri))
        try:
            dl = await self._take_over_with(self.obj, lock_fd, self.readers <= 0)
        except BaseException:
            with trio.CancelScope(shield=True):  # cancelled too (a stop): the lock must not stay held
                await run_else(self._store.partials.unlock, self._store.partials.drop_lock, self.obj, lock_fd)
            raise
        for i in range(self.readers):
            dl.add_reader(served=i < self.served)
        self.delegate = dl
        self._wake()
        await dl.finished.wait()
        self.complete, self.error = dl.complete, dl.error

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _close_part(self) -> None:
        if self._part_map is not None:
            self._part_map.close()
            self._part_map = None
        if self._part_fd >= 0:
            os.close(self._part_fd)
            self._part_fd = -1
        self._part_ino = -1
        self._done = frozenset()

    def _maybe_close(self) -> None:
        if self.readers > 0 or not self.finished.is_set():
            return
        self._close_part()
        if self._local_map is not None:
            self._local_map.close()
            self._local_map = None
        if self._local is not None:
            os.close(self._local.fd)
            self._local = None


# -- the owner's side: what followers' readers wait for ------------------------------------

async def hear_wants(store: Store, downloads: Callable[[], Iterable[Download]], limiter: trio.CapacityLimiter,
                     poke: Callable[[], None]) -> None:
    """Demand what readers in other processes wait for (they follow our
    downloads through the store and append to a want file): their reads
    then jump the queue as a reader's here does, where otherwise they would
    wait for the sweep to get there (past the read deadline, in a large file)."""
    while True:
        await trio.sleep(WANTS_POLL_S)
        running = [dl for dl in downloads() if not dl.finished.is_set()]
        if not running:
            continue
        try:
            heard = await run_sync(_read_wants, store, [(dl.obj, dl.wants_read) for dl in running], limiter=limiter)
        except NoThread:
            continue  # (threads.py said it) heard at a later round
        wanted = False
        for dl, (offset, ranges) in zip(running, heard, strict=True):
            dl.wants_read = offset
            for start, end in ranges:
                wanted = dl.want(start, end) or wanted
        if wanted:
            poke()


def _read_wants(store: Store, reads: list[tuple[RemoteObject, int]]) -> list[tuple[int, list[tuple[int, int]]]]:
    """Worker thread: each download's new wants (PartialFiles.wants); a
    want file that cannot be read is heard as none."""
    heard = []
    for obj, offset in reads:
        try:
            heard.append(store.partials.wants(obj, offset))
        except OSError:
            heard.append((offset, []))
    return heard
