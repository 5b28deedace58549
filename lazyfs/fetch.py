"""The download engine: one download per object version, fetched as parallel
ranged GETs straight into a sparse file in the store, served while it arrives,
verified, then published.

Concurrency (see also docs/concurrency.md):
  * Everything here runs on the trio thread except `_fetch_chunk_blocking`,
    `_finish_blocking` and the store calls, which run in worker threads.
  * `Fetcher._downloads` maps an object version to its one live Download.
    `acquire` checks the store and the registry under a per-version trio.Lock,
    so concurrent first opens share one download and never race a publish.
  * A Download's chunk states, fill levels and waiters change only on the trio
    thread.  Worker threads only pwrite their own chunk's byte range into the
    sparse file and post progress back with `TrioToken.run_sync_soon`.
  * One dispatcher task hands out connection slots (a Semaphore of
    `max_connections`) by priority: chunks a reader is blocked on first, then
    downloads someone has open (fewest chunks in flight first, so parallel
    readers share), then background prefetch (oldest first).
  * The sparse file's descriptor belongs to the Download and is closed on the
    trio thread only, once no worker thread and no reader uses it; reads on it
    are plain preads on the trio thread, so a close can never race a read.
Crash cases: a chunk is recorded on disk only after an fdatasync, so a resumed
download trusts exactly the chunks that are really there; a partial file lives
in .lazyfs/tmp under a name no reader ever opens, so it is never served as whole.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import deque
from typing import Awaitable, Callable, Union

import trio

from lazyfs import verify
from lazyfs.budget import Budget
from lazyfs.config import FetchConfig
from lazyfs.errors import (IntegrityError, LazyfsError, ObjectChanged, RemoteError,
                           RemoteUnavailable, StoreError)
from lazyfs.namespace import RemoteObject
from lazyfs.remote import Remote
from lazyfs.store import FileMap, Identity, LocalCopy, Partial, Store

log = logging.getLogger(__name__)

PENDING, ACTIVE, DONE = 0, 1, 2
# First bytes of a chunk are posted early so a reader of a file's header
# waits for one round trip plus 64 KiB, not for a whole 8 MiB chunk.
_FIRST_PIECE = 64 * 1024
_PIECE = 1024 * 1024
# Chunk completions are made durable (fdatasync + state file) at most this often.
_STATE_EVERY_S = 1.0
_VERIFY_ATTEMPTS = 2


class Download:
    """The fetch of one object version into a Partial."""

    def __init__(self, fetcher: "Fetcher", obj: RemoteObject, partial: Partial,
                 background: bool, keep: bool = True) -> None:
        self.fetcher = fetcher
        self.obj = obj
        self.background = background
        # False: larger than the cache budget; served, then thrown away.
        self.keep = keep
        self.readers = 0
        self.started = time.monotonic()
        self.error: BaseException | None = None
        self.complete = False  # verified and published
        self.finished = trio.Event()  # complete or failed
        self.cancelled = False  # read by worker threads: stop at the next piece
        self.threads = 0  # worker threads and bookkeeping tasks using `fd`
        self.bytes_fetched = 0
        self.verify_attempts = 0
        self._fd_closed = False
        self._state_saved_at = 0.0
        self._saving = False
        self._attach(partial)

    def _attach(self, partial: Partial) -> None:
        self.partial = partial
        self.fd = partial.fd
        self.fmap = FileMap(partial.fd, partial.obj.size)
        self.nchunks = partial.chunks
        self.part_size = partial.part_size
        self.state = bytearray(self.nchunks)
        for i in partial.done:
            self.state[i] = DONE
        self.ndone = len(partial.done)
        self.filled: dict[int, int] = {}
        self.demand: deque[int] = deque()
        self.waiters: list[tuple[int, int, trio.Event]] = []
        self.sweep = 0

    @property
    def ident(self) -> tuple[str, str, str, int]:
        return (self.obj.bucket, self.obj.key, self.obj.etag, self.obj.size)

    @property
    def fetched_bytes(self) -> int:
        """Bytes of the object on local disk so far."""
        if self.complete:
            return self.obj.size
        total = sum(min(self.part_size, self.obj.size - i * self.part_size)
                    for i in range(self.nchunks) if self.state[i] == DONE)
        return total + sum(self.filled.values())

    def chunk_range(self, i: int) -> tuple[int, int]:
        start = i * self.part_size
        return start, min(self.obj.size, start + self.part_size)

    # -- readers -------------------------------------------------------------

    def covered(self, start: int, end: int) -> bool:
        """Are bytes [start, end) on disk?"""
        if self.complete or end <= start:
            return True
        for i in range(start // self.part_size, (end - 1) // self.part_size + 1):
            st = self.state[i]
            if st == DONE:
                continue
            if st == ACTIVE:
                c_start, c_end = self.chunk_range(i)
                if c_start + self.filled.get(i, 0) >= min(end, c_end):
                    continue
            return False
        return True

    async def wait_range(self, start: int, end: int) -> None:
        """Return once [start, end) is on disk; jump the queue for it."""
        end = min(end, self.obj.size)
        if self.error is not None:
            raise self.error
        if self.covered(start, end):
            return
        for i in range(start // self.part_size, (end - 1) // self.part_size + 1):
            if self.state[i] == PENDING and i not in self.demand:
                self.demand.append(i)
        event = trio.Event()
        self.waiters.append((start, end, event))
        self.fetcher.poke()
        try:
            with trio.fail_after(self.fetcher.cfg.read_deadline):
                await event.wait()
        except trio.TooSlowError:
            raise RemoteUnavailable(f"{self.obj.uri}: no data for bytes {start}-{end} within "
                                    f"{self.fetcher.cfg.read_deadline:g} s", bucket=self.obj.bucket,
                                    key=self.obj.key) from None
        finally:
            self.waiters = [w for w in self.waiters if w[2] is not event]
        if self.error is not None:
            raise self.error

    def _wake(self) -> None:
        if not self.waiters:
            return
        keep = []
        for w in self.waiters:
            if self.error is not None or self.covered(w[0], w[1]):
                w[2].set()
            else:
                keep.append(w)
        self.waiters = keep

    def add_reader(self) -> None:
        self.readers += 1

    def drop_reader(self) -> None:
        self.readers -= 1
        self._maybe_close_fd()

    # -- scheduling -------------------------------------------------------------

    def next_chunk(self, demanded_only: bool = False) -> int | None:
        while self.demand:
            i = self.demand.popleft()
            if self.state[i] == PENDING:
                return i
        if demanded_only:
            return None
        while self.sweep < self.nchunks and self.state[self.sweep] != PENDING:
            self.sweep += 1
        return self.sweep if self.sweep < self.nchunks else None

    def active_chunks(self) -> int:
        return len(self.filled)

    def _maybe_close_fd(self) -> None:
        if self.finished.is_set() and self.threads == 0 and self.readers <= 0 and not self._fd_closed:
            self._fd_closed = True
            self.fmap.close()
            os.close(self.fd)
            if not self.keep:
                self.fetcher._spawn(self.fetcher._discard, self.partial)


LocalOrDownload = Union[LocalCopy, Download]


class Fetcher:
    def __init__(self, remote: Remote, store: Store, cfg: FetchConfig,
                 on_changed: Callable[[RemoteObject], None] | None = None, origin: str = "fetch") -> None:
        self.remote = remote
        self.store = store
        self.cfg = cfg
        self.origin = origin  # recorded with each published file (see store.Identity)
        self.budget: Budget | None = None
        # Called with an object whose downloaded bytes failed verification, so
        # the kernel drops any pages of them it cached for readers.
        self.on_bad_data: Callable[[RemoteObject], Awaitable[None]] | None = None
        self.on_changed = on_changed
        # True while the object store is known to be unreachable (offline
        # start): a file with no local copy then fails at once.
        self.offline: Callable[[], bool] = lambda: False
        self._downloads: dict[tuple[str, str, str, int], Download] = {}
        self._verified: dict[tuple, bool] = {}  # --verify etag results for unrecorded copies
        self._locks: dict[tuple[str, str, str, int], list] = {}
        self._slots = trio.Semaphore(cfg.max_connections)
        self._threads = trio.CapacityLimiter(cfg.max_connections + 4)
        self._work = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._closing = False
        # Totals for logs and stats.
        self.bytes_from_s3 = 0
        self.gets = 0

    def downloads(self) -> list[Download]:
        return list(self._downloads.values())

    def active(self, obj: RemoteObject) -> Download | None:
        return self._downloads.get((obj.bucket, obj.key, obj.etag, obj.size))

    # -- lifecycle ----------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._dispatch()

    async def close(self, grace: float = 2.0) -> None:
        """Stop fetching: readers still waiting get EIO, worker threads stop at
        their next piece, and the chunks on disk are recorded for a resume.
        Waits at most `grace` seconds for that."""
        self._closing = True
        live = list(self._downloads.values())
        for dl in live:
            if dl.ndone < dl.nchunks:  # complete ones are being verified and published: let them
                self._fail(dl, _Stopped())
        with trio.move_on_after(grace):
            for dl in live:
                while dl.threads:
                    await trio.sleep(0.02)

    def poke(self) -> None:
        self._work.set()

    async def state_of(self, obj: RemoteObject) -> tuple[str, int]:
        """(state, bytes on disk) for operators: "downloading", or the store's
        view ("cached", "prebaked", "partial", "stale", "missing").  Never
        fetches anything."""
        dl = self.active(obj)
        if dl is not None:
            return "downloading", dl.fetched_bytes
        st = await trio.to_thread.run_sync(self.store.local_state, obj, limiter=self._threads)
        return st.state, st.bytes

    # -- entry point ----------------------------------------------------------------

    async def acquire(self, obj: RemoteObject, background: bool = False) -> LocalOrDownload:
        """A current local copy of `obj`, or the (new or running) download of it."""
        ident = (obj.bucket, obj.key, obj.etag, obj.size)
        entry = self._locks.setdefault(ident, [trio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                dl = self._downloads.get(ident)
                if dl is not None:
                    if not background:
                        dl.background = False
                    return dl
                copy = await trio.to_thread.run_sync(self.store.find_current, obj, limiter=self._threads)
                if copy is not None and copy.state == "prebaked" and self.cfg.verify_prebaked:
                    copy = await self._checked_prebaked(obj, copy)
                if copy is not None:
                    return copy
                copy = await self._materialise(obj)
                if copy is not None:
                    return copy
                if self._closing:
                    raise RemoteUnavailable(f"{obj.uri}: lazyfs is shutting down")
                if self.offline():
                    raise RemoteUnavailable(f"{obj.uri} is not in the local cache and the object "
                                            "store is unreachable", bucket=obj.bucket, key=obj.key)
                return await self._start(obj, background)
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[ident]

    async def _checked_prebaked(self, obj: RemoteObject, copy: LocalCopy) -> LocalCopy | None:
        """--verify etag: a copy with no identity record is used only if its
        content matches what S3 vouches for; a match is recorded (in the store)
        or remembered (read-only layers), so it is checked once."""
        ok = await trio.to_thread.run_sync(self._prebaked_ok, obj, copy, limiter=self._threads)
        if ok:
            return copy
        os.close(copy.fd)
        return None

    def _prebaked_ok(self, obj: RemoteObject, copy: LocalCopy) -> bool:
        st = os.fstat(copy.fd)
        memo_key = (copy.layer.label, obj.key, obj.etag, st.st_ino, st.st_mtime_ns, st.st_size)
        if memo_key in self._verified:
            return self._verified[memo_key]
        try:
            exp = self._expectation(obj)
        except RemoteError as e:
            log.warning("%s: cannot check the local copy's content (%s); using it as its size matches",
                        obj.uri, e)
            return True
        if exp is None:
            log.warning("%s: S3 offers nothing to check the local copy against (multipart or "
                        "KMS-encrypted, no checksum); using it as its size matches", obj.uri)
            ok = True
        else:
            ok = verify.compute(copy.fd, obj.size, exp) == exp.value
            if ok and copy.layer.writable:
                self.store.record(copy.fd, Identity.of(obj, "prebaked"))
            if not ok:
                log.warning("%s: the local copy in the %s does not match the object's %s; "
                            "downloading it again", obj.uri, copy.layer.label, exp.algorithm)
        self._verified[memo_key] = ok
        return ok

    async def _materialise(self, obj: RemoteObject) -> LocalCopy | None:
        try:
            copy = await trio.to_thread.run_sync(self.store.materialise, obj, limiter=self._threads)
        except (OSError, StoreError) as e:
            log.warning("%s: could not reuse an identical local file: %s", obj.uri, e)
            return None
        if copy is not None:
            log.info("%s: same content as a file already in the store; linked, not downloaded", obj.uri)
        return copy

    async def _start(self, obj: RemoteObject, background: bool) -> Download:
        keep = await self.budget.reserve(obj) if self.budget is not None else True
        try:
            partial = await trio.to_thread.run_sync(self.store.open_partial, obj, self.cfg.part_size,
                                                    limiter=self._threads)
        except OSError as e:
            raise StoreError(f"{obj.uri}: cannot create a download file in the store: {e.strerror}",
                             e.errno) from None
        dl = Download(self, obj, partial, background, keep)
        self._downloads[dl.ident] = dl
        if dl.partial.done:
            log.info("%s: resuming download, %d of %d chunks already on disk", obj.uri,
                     len(dl.partial.done), dl.nchunks)
        if obj.size == 0 or dl.ndone == dl.nchunks:
            dl.state[:] = bytes([DONE]) * dl.nchunks
            dl.ndone = dl.nchunks
            self._spawn(self._finish, dl)
        self.poke()
        return dl

    def _spawn(self, fn: Callable, *args: object) -> None:
        assert self._nursery is not None, "Fetcher.run() is not running"
        self._nursery.start_soon(fn, *args)

    # -- dispatcher -------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            while True:
                picked = self._pick()
                if picked is not None:
                    break
                self._work = trio.Event()
                await self._work.wait()
            dl, i = picked
            dl.state[i] = ACTIVE
            dl.filled[i] = 0
            dl.threads += 1
            self._spawn(self._run_chunk, dl, i)

    def _pick(self) -> tuple[Download, int] | None:
        if self._closing:
            return None
        live = [dl for dl in self._downloads.values() if dl.error is None and not dl.cancelled]
        for dl in live:  # 1: a reader is blocked on this chunk
            i = dl.next_chunk(demanded_only=True)
            if i is not None:
                return dl, i
        fg = sorted((dl for dl in live if not dl.background or dl.readers > 0),
                    key=lambda d: (d.active_chunks(), d.started))
        bg = sorted((dl for dl in live if dl.background and dl.readers <= 0), key=lambda d: d.started)
        for dl in fg + bg:  # 2: open files, sharing; 3: prefetch, oldest first
            i = dl.next_chunk()
            if i is not None:
                return dl, i
        return None

    async def _run_chunk(self, dl: Download, i: int) -> None:
        try:
            await trio.to_thread.run_sync(self._fetch_chunk_blocking, dl, i, limiter=self._threads,
                                          abandon_on_cancel=True)
        except BaseException as e:
            dl.threads -= 1
            self._slots.release()
            if dl.state[i] == ACTIVE:
                dl.state[i] = PENDING
                dl.filled.pop(i, None)
            if isinstance(e, Exception):
                self._fail(dl, e)
            dl._maybe_close_fd()
            if not isinstance(e, Exception):
                raise
            return
        dl.threads -= 1
        self._slots.release()
        dl.state[i] = DONE
        dl.filled.pop(i, None)
        dl.ndone += 1
        dl.partial.done.add(i)
        dl._wake()
        self.poke()
        if dl.ndone == dl.nchunks:
            self._spawn(self._finish, dl)
        else:
            self._maybe_save_state(dl)

    def _fetch_chunk_blocking(self, dl: Download, i: int) -> None:
        """Worker thread: GET one chunk (resuming within it after a broken body)."""
        start, end = dl.chunk_range(i)
        pos = start
        attempt = 0
        token = self._token
        assert token is not None
        while True:
            if dl.cancelled:
                raise _Stopped()
            try:
                stream = self.remote.get_range(dl.obj, pos, end)
            except RemoteError:
                raise  # botocore already retried what is retryable before a body arrives
            token.run_sync_soon(self._count_get)
            try:
                piece = _FIRST_PIECE
                while pos < end:
                    if dl.cancelled:
                        raise _Stopped()
                    data = stream.read(min(piece, end - pos))
                    piece = _PIECE
                    _pwrite_all(dl.fd, data, pos)
                    pos += len(data)
                    token.run_sync_soon(self._progress, dl, i, pos - start, len(data))
                return
            except RemoteUnavailable as e:
                attempt += 1
                if attempt >= self.cfg.chunk_attempts:
                    raise
                delay = min(8.0, 0.2 * 2 ** attempt) * random.uniform(0.5, 1.5)
                log.info("%s: %s; retrying bytes %d-%d in %.1f s (attempt %d of %d)", dl.obj.uri, e,
                         pos, end - 1, delay, attempt + 1, self.cfg.chunk_attempts)
                time.sleep(delay)
            finally:
                stream.close()

    def _count_get(self) -> None:
        self.gets += 1

    def _progress(self, dl: Download, i: int, filled: int, nbytes: int) -> None:
        self.bytes_from_s3 += nbytes
        dl.bytes_fetched += nbytes
        if dl.state[i] == ACTIVE:
            dl.filled[i] = filled
            dl._wake()

    def _maybe_save_state(self, dl: Download) -> None:
        """Record finished chunks for a resume, at most once per _STATE_EVERY_S
        (a save that comes too soon is deferred, not dropped)."""
        if dl._saving:
            return
        dl._saving = True
        self._spawn(self._save_state, dl)

    async def _save_state(self, dl: Download) -> None:
        dl.threads += 1  # pins the descriptor
        try:
            wait = dl._state_saved_at + _STATE_EVERY_S - time.monotonic()
            if wait > 0:
                await trio.sleep(wait)
            snapshot = frozenset(dl.partial.done)
            if not dl.finished.is_set():
                dl._state_saved_at = time.monotonic()
                await trio.to_thread.run_sync(dl.partial.save_state, snapshot, limiter=self._threads)
        except OSError as e:
            log.warning("%s: could not record download progress: %s", dl.obj.uri, e.strerror)
            snapshot = frozenset(dl.partial.done)  # do not retry in a loop
        finally:
            dl._saving = False
            dl.threads -= 1
            dl._maybe_close_fd()
        if not dl.finished.is_set() and dl.partial.done != snapshot:
            self._maybe_save_state(dl)  # chunks finished while this save ran

    # -- completion ---------------------------------------------------------------------

    async def _finish(self, dl: Download) -> None:
        dl.threads += 1
        try:
            await trio.to_thread.run_sync(self._finish_blocking, dl, limiter=self._threads)
        except IntegrityError as e:
            dl.threads -= 1
            dl.verify_attempts += 1
            if self.on_bad_data is not None:
                self._spawn(self.on_bad_data, dl.obj)
            if dl.verify_attempts < _VERIFY_ATTEMPTS and not dl.cancelled:
                log.warning("%s; downloading it again", e)
                await self._restart(dl)
                return
            self._fail(dl, e, discard=True)
            return
        except Exception as e:
            dl.threads -= 1
            self._fail(dl, e)
            return
        dl.threads -= 1
        dl.complete = True
        if self.budget is not None and dl.keep:
            self.budget.published(dl.obj)
        elapsed = max(time.monotonic() - dl.started, 1e-6)
        log.info("fetched %s: %d bytes in %.2f s (%.1f MB/s) from S3", dl.obj.uri,
                 dl.obj.size, elapsed, dl.bytes_fetched / elapsed / 1e6)
        self._retire(dl)

    def _finish_blocking(self, dl: Download) -> None:
        if dl.obj.size:
            exp = self._expectation(dl.obj)
            if exp is not None:
                verify.check(dl.fd, dl.obj.size, exp, dl.obj.uri, lambda: dl.cancelled)
                log.debug("%s: verified %s", dl.obj.uri, exp.describe())
            else:
                log.debug("%s: nothing to verify against beyond the size", dl.obj.uri)
        if not dl.keep:
            return
        try:
            self.store.publish(dl.partial, self.origin)
        except OSError as e:
            raise StoreError(f"{dl.obj.uri}: cannot publish into the store: {e.strerror}", e.errno) from None

    def _expectation(self, obj: RemoteObject) -> verify.Expectation | None:
        info = self.remote.head(obj.bucket, obj.key, etag=obj.etag)
        return verify.choose(obj.etag, info.checksum, info.etag_is_md5,
                             lambda: self.remote.part_size(obj))

    async def _restart(self, dl: Download) -> None:
        old_fd = dl.fd
        try:
            await trio.to_thread.run_sync(self.store.discard, dl.partial, limiter=self._threads)
            partial = await trio.to_thread.run_sync(self.store.open_partial, dl.obj, self.cfg.part_size,
                                                    limiter=self._threads)
        except OSError as e:
            self._fail(dl, StoreError(f"{dl.obj.uri}: cannot restart download: {e.strerror}", e.errno))
            return
        old_map = dl.fmap
        dl._attach(partial)
        old_map.close()
        os.close(old_fd)  # no thread uses it: every chunk had finished
        self.poke()

    def _fail(self, dl: Download, e: BaseException, discard: bool | None = None) -> None:
        if dl.error is not None or dl.finished.is_set():
            return
        dl.error = e
        dl.cancelled = True
        if isinstance(e, _Stopped):
            dl.error = RemoteUnavailable(f"{dl.obj.uri}: download stopped (lazyfs is shutting down)",
                                         bucket=dl.obj.bucket, key=dl.obj.key)
        elif isinstance(e, ObjectChanged):
            log.warning("%s: changed in the object store during the download; the new version "
                        "will be fetched on the next open", dl.obj.uri)
            if self.on_changed is not None:
                self.on_changed(dl.obj)
        elif isinstance(e, LazyfsError):
            log.error("download of %s failed: %s", dl.obj.uri, e)
        else:
            log.error("download of %s failed unexpectedly", dl.obj.uri, exc_info=e)
        if discard is None:
            # A changed object or bad bytes are worthless; an interrupted
            # download of the right version is resumed by the next open.
            discard = isinstance(e, (ObjectChanged, IntegrityError))
        dl.threads += 1  # pinned until the cleanup below is done with the file
        self._spawn(self._cleanup_failed, dl, discard)
        dl._wake()
        self._retire(dl)

    async def _cleanup_failed(self, dl: Download, discard: bool) -> None:
        try:
            with trio.move_on_after(30):
                while dl.threads > 1:
                    await trio.sleep(0.05)
            if dl.threads > 1:
                return  # a stuck thread may still write: leave its file alone
            if discard:
                await trio.to_thread.run_sync(self.store.discard, dl.partial, limiter=self._threads)
            else:
                await trio.to_thread.run_sync(dl.partial.save_state, frozenset(dl.partial.done),
                                              limiter=self._threads)
        except OSError as e:
            log.warning("%s: cleaning up after a failed download: %s", dl.obj.uri, e.strerror)
        finally:
            dl.threads -= 1
            dl._maybe_close_fd()

    async def _discard(self, partial: Partial) -> None:
        try:
            await trio.to_thread.run_sync(self.store.discard, partial, limiter=self._threads)
        except OSError as e:
            log.warning("%s: could not remove a temporary download: %s", partial.obj.uri, e.strerror)

    def _retire(self, dl: Download) -> None:
        if self._downloads.get(dl.ident) is dl:
            del self._downloads[dl.ident]
        dl.finished.set()
        dl._wake()
        dl._maybe_close_fd()
        self.poke()


class _Stopped(Exception):
    """A worker thread noticed its download was cancelled."""


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def chunks_for(size: int, part_size: int) -> int:
    return max(1, math.ceil(size / part_size))
