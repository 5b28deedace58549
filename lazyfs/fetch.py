"""The download engine: one download per object version, fetched as parallel
ranged GETs straight into a sparse file in the store, served while it
arrives, verified, then published.

The engine is made of small parts: `probe` (what the store has, one thread
hop), `download` (one download's block state), `dispatch` (which bytes go on
the wire next), `ranged_get` and `completion` (the blocking work, in worker
threads), `coop` (a download another process runs).  This module owns the
registry of downloads and their lifecycle: acquire, start, finish, fail,
close.  Who runs where, what each may write, and the descriptor pins are
described in docs/concurrency.md; every rule there holds here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import threading
import time
from typing import AsyncIterator, Awaitable, Callable

import trio

from lazyfs.budget import Budget
from lazyfs.completion import verify_and_publish_blocking
from lazyfs.config import FetchConfig
from lazyfs.coop import ForeignDownload
from lazyfs.dispatch import Dispatcher
from lazyfs.download import Download, Limits, Pin, Request
from lazyfs.errors import IntegrityError, LazyfsError, ObjectChanged, ObjectNotFound, RemoteUnavailable, StoreError
from lazyfs.filemap import PageBudget
from lazyfs.filestate import FileState
from lazyfs.namespace import RemoteObject, Version
from lazyfs.partials import Partial
from lazyfs.probe import Fetch, Foreign, Local, PrebakedCheck, Unavailable, open_partial_file, probe_store
from lazyfs.ranged_get import RangeJob, Stopped, fetch_range_blocking
from lazyfs.remote import Remote, ResponseMeta
from lazyfs.stats import DOWNLOAD_SECONDS, STATS
from lazyfs.store import LocalCopy, Store
from lazyfs.transfer import Transfer

log = logging.getLogger(__name__)

# Block completions are made durable (fdatasync + resume record) at most this often.
_STATE_EVERY_S = 1.0
_VERIFY_ATTEMPTS = 2
# Long first downloads log their progress this often.
_PROGRESS_EVERY_S = 5.0
# Store operations (opens, publishing, verification) in flight at once.
_IO_THREADS = 8

LocalOrTransfer = LocalCopy | Download | ForeignDownload


class _VersionLocks:
    """A trio.Lock per object version, kept while anyone holds or waits for it."""

    def __init__(self) -> None:
        self._entries: dict[Version, tuple[trio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, version: Version) -> AsyncIterator[None]:
        lock, users = self._entries.setdefault(version, (trio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._entries[version]


class _Handoff:
    """Who releases a request's pin: the worker thread once it has started (it
    may outlive a task abandoned on cancel, and must keep the descriptor open
    until its last write), or the task when it was cancelled before that."""

    def __init__(self, pin: Pin) -> None:
        self.pin = pin
        self._lock = threading.Lock()
        self._owner = ""  # "" undecided, "thread", "task"

    def thread_starts(self) -> bool:
        with self._lock:
            if self._owner == "task":
                return False
            self._owner = "thread"
            return True

    def task_gives_up(self) -> None:
        with self._lock:
            if self._owner:
                return
            self._owner = "task"
        self.pin.release()


class Fetcher:
    def __init__(self, remote: Remote, store: Store, cfg: FetchConfig, pages: PageBudget | None = None,
                 origin: str = "fetch") -> None:
        self.remote = remote
        self.store = store
        self.cfg = cfg
        self.pages = pages or PageBudget()
        self.origin = origin  # recorded with each published file (see identity.Identity)
        self.budget: Budget | None = None
        # Called with an object whose downloaded bytes failed verification, so
        # the kernel drops any pages of them it cached for readers.
        self.on_bad_data: Callable[[RemoteObject], Awaitable[None]] | None = None
        # Called with an object that changed or vanished in the object store.
        self.on_changed: Callable[[RemoteObject], None] | None = None
        # True while the object store is known to be unreachable (offline
        # start): a file with no local copy then fails at once.
        self.offline: Callable[[], bool] = lambda: False
        self._downloads: dict[Version, Download] = {}
        self._foreign: dict[Version, ForeignDownload] = {}  # run by another process (coop.py)
        self._locks = _VersionLocks()
        self._prebaked = PrebakedCheck(remote, store) if cfg.verify_prebaked else None
        self._limits = Limits(part_blocks=max(1, cfg.part_size // cfg.block_size),
                              max_requests=cfg.max_connections, read_deadline=cfg.read_deadline)
        self._dispatcher = Dispatcher(cfg.max_connections, self._downloads.values, self._start_request)
        # Threads: one per ranged GET in flight, and a few for the store, so that
        # ten thousand small prefetched files queueing for the disk never hold up
        # the network, nor the other way round.
        self._net = trio.CapacityLimiter(cfg.max_connections)
        self._io = trio.CapacityLimiter(_IO_THREADS)
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        # Totals for logs and stats.
        self.bytes_from_s3 = 0
        self.bytes_published = 0

    def downloads(self) -> list[Download]:
        return list(self._downloads.values())

    def active(self, obj: RemoteObject) -> Download | None:
        return self._downloads.get(obj.version)

    @property
    def closing(self) -> bool:
        return self._dispatcher.closing

    # -- lifecycle ----------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._dispatcher.run()

    async def close(self, grace: float = 2.0) -> None:
        """Stop fetching: readers still waiting get EIO, worker threads stop at
        their next piece, and the blocks on disk are recorded for a resume.
        Waits at most `grace` seconds for that."""
        self._dispatcher.closing = True
        live = list(self._downloads.values())
        for dl in live:
            if not dl.all_done:  # complete ones are being verified and published: let them
                self._fail(dl, Stopped())
        with trio.move_on_after(grace):
            for dl in live:
                while dl.pins:
                    await trio.sleep(0.02)

    def poke(self) -> None:
        self._dispatcher.poke()

    async def state_of(self, obj: RemoteObject) -> tuple[FileState, int]:
        """(state, bytes on disk) for operators.  Never fetches anything."""
        transfer: Transfer | None = self.active(obj) or self._foreign.get(obj.version)
        if transfer is not None:
            return FileState.DOWNLOADING, transfer.fetched_bytes
        st = await trio.to_thread.run_sync(self.store.local_state, obj, limiter=self._io)
        return st.state, st.bytes

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        assert self._nursery is not None, "Fetcher.run() is not running"
        self._nursery.start_soon(fn, *args)

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        """From a worker thread: run `fn` on the trio thread (dropped once the
        trio run is over: nothing is left to tell)."""
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    # -- entry point ----------------------------------------------------------------

    async def acquire(self, obj: RemoteObject, background: bool = False) -> LocalOrTransfer:
        """A current local copy of `obj`, or the (new or running) download of it."""
        async with self._locks.hold(obj.version):
            dl = self._downloads.get(obj.version)
            if dl is not None:
                if not background:
                    dl.background = False
                return dl
            follower = self._foreign.get(obj.version)
            if follower is not None:
                return follower
            probe = functools.partial(probe_store, self.store, obj, may_fetch=not self.closing and not self.offline(),
                                      open_partial=self.budget is None, block_size=self.cfg.block_size,
                                      check_prebaked=self._prebaked)
            verdict = await trio.to_thread.run_sync(probe, limiter=self._io)
            if isinstance(verdict, Local):
                if verdict.linked:
                    STATS.linked_files += 1
                    log.info("%s: same content as a file already in the store; linked, not downloaded",
                             obj.uri, extra={"event": "linked", "key": obj.key, "bytes": obj.size,
                                             "source": "store"})
                return verdict.copy
            if isinstance(verdict, Unavailable):
                if self.closing:
                    raise RemoteUnavailable(f"{obj.uri}: lazyfs is shutting down")
                raise RemoteUnavailable(f"{obj.uri} is not in the local cache and the object "
                                        "store is unreachable", bucket=obj.bucket, key=obj.key)
            if isinstance(verdict, Foreign):
                follower = ForeignDownload(obj, self.store, self.pages, self._io, self.cfg.read_deadline,
                                           self.start_locked, self._followed)
                self._foreign[obj.version] = follower
                self._spawn(follower.follow)
                return follower
            assert isinstance(verdict, Fetch)
            try:
                if verdict.partial is not None:
                    return self._begin(obj, verdict.partial, verdict.lock_fd, background, keep=True)
                return await self.start_locked(obj, verdict.lock_fd, background)
            except BaseException:
                await trio.to_thread.run_sync(self.store.partials.unlock, obj, verdict.lock_fd, limiter=self._io)
                raise

    def _followed(self, follower: ForeignDownload) -> None:
        if self._foreign.get(follower.obj.version) is follower:
            del self._foreign[follower.obj.version]

    async def start_locked(self, obj: RemoteObject, lock: int, background: bool) -> Download:
        """Start (or resume) the download of `obj`, holding its store lock."""
        keep = await self.budget.reserve(obj) if self.budget is not None else True
        partial = await trio.to_thread.run_sync(open_partial_file, self.store, obj, self.cfg.block_size,
                                                limiter=self._io)
        return self._begin(obj, partial, lock, background, keep)

    def _begin(self, obj: RemoteObject, partial: Partial, lock: int, background: bool, keep: bool) -> Download:
        if self.closing:  # shutdown began while the store was being prepared (caller unlocks)
            partial.close()
            raise RemoteUnavailable(f"{obj.uri}: lazyfs is shutting down", bucket=obj.bucket, key=obj.key)
        dl = Download(obj, partial, self._limits, self.pages, background=background, keep=keep,
                      on_work=self.poke, on_closed=self._discard_later)
        dl.lock_fd = lock
        self._downloads[obj.version] = dl
        if partial.done:
            log.info("%s: resuming download, %d of %d blocks already on disk", obj.uri,
                     len(partial.done), dl.nblocks)
        if obj.size == 0 or dl.all_done:
            dl.mark_all_done()
            self._spawn(self._finish, dl)
        self.poke()
        return dl

    # -- requests ---------------------------------------------------------------------

    def _start_request(self, dl: Download, req: Request) -> None:
        """From the dispatcher: fetch `req` in a worker thread, its download pinned."""
        self._spawn(self._run_request, dl, req, _Handoff(dl.pin()))

    async def _run_request(self, dl: Download, req: Request, handoff: _Handoff) -> None:
        job = RangeJob(obj=dl.obj, fd=dl.fd, write_lock=dl.write_lock, start=req.start, end=req.end,
                       block_size=dl.block_size, attempts=self.cfg.chunk_attempts,
                       cancelled=lambda: dl.cancelled,
                       posted=lambda n: self._post(self._landed, dl, req, n),
                       got_meta=lambda meta: self._post(self._got_meta, dl, meta))
        try:
            await trio.to_thread.run_sync(self._request_thread, job, handoff, limiter=self._net,
                                          abandon_on_cancel=True)
        except BaseException as e:
            handoff.task_gives_up()
            self._dispatcher.release()
            dl.abandon(req)
            if not isinstance(e, Exception):
                raise
            self._fail(dl, e)
            return
        self._dispatcher.release()
        self._landed(dl, req, req.end - req.start)
        if dl.all_done and dl.error is None and not dl.finished.is_set():
            self._spawn(self._finish, dl)

    def _request_thread(self, job: RangeJob, handoff: _Handoff) -> None:
        if not handoff.thread_starts():
            return  # the task was cancelled first and released the pin
        try:
            fetch_range_blocking(self.remote, job)
        finally:
            self._post(handoff.pin.release)

    def _got_meta(self, dl: Download, meta: ResponseMeta) -> None:
        if dl.meta is None or meta.checksum is not None:
            dl.meta = meta  # read at verification time

    def _landed(self, dl: Download, req: Request, filled: int) -> None:
        """Progress from a worker: account bytes, complete blocks, wake readers."""
        new = filled - req.filled
        if new > 0:
            self.bytes_from_s3 += new
            STATS.fetched_bytes += new
            dl.bytes_fetched += new
        done = dl.progress(req, filled)
        if done:
            dl.partial.done.update(done)
            self._save_state_soon(dl)
        now = time.monotonic()
        if now - dl.last_progress_log >= _PROGRESS_EVERY_S and dl.readers > 0 and not dl.background:
            dl.last_progress_log = now
            rate = dl.bytes_fetched / max(now - dl.started, 1e-6)
            log.info("downloading %s: %.0f%% (%.1f of %.1f MiB, %.1f MB/s)", dl.obj.uri,
                     100.0 * dl.ndone / dl.nblocks, dl.fetched_bytes / 2**20, dl.obj.size / 2**20, rate / 1e6)

    def _save_state_soon(self, dl: Download) -> None:
        """Record finished blocks for a resume, at most once per _STATE_EVERY_S
        (a save that comes too soon is deferred, not dropped)."""
        if not dl.saving:
            dl.saving = True
            self._spawn(self._save_state, dl, dl.pin())

    async def _save_state(self, dl: Download, pin: Pin) -> None:
        with pin:
            try:
                wait = dl.state_saved_at + _STATE_EVERY_S - time.monotonic()
                if wait > 0:
                    await trio.sleep(wait)
                snapshot = frozenset(dl.partial.done)
                if not dl.finished.is_set():
                    dl.state_saved_at = time.monotonic()
                    await trio.to_thread.run_sync(dl.partial.save_state, snapshot, limiter=self._io)
            except OSError as e:
                log.warning("%s: could not record download progress: %s", dl.obj.uri, e.strerror)
                snapshot = frozenset(dl.partial.done)  # do not retry in a loop
            finally:
                dl.saving = False
        if not dl.finished.is_set() and dl.partial.done != snapshot:
            self._save_state_soon(dl)  # blocks finished while this save ran

    # -- completion ---------------------------------------------------------------------

    async def _finish(self, dl: Download) -> None:
        publish = functools.partial(verify_and_publish_blocking, self.remote, self.store, dl.partial, dl.meta,
                                    keep=dl.keep, origin=self.origin, cancelled=lambda: dl.cancelled)
        try:
            with dl.pin():
                await trio.to_thread.run_sync(publish, limiter=self._io)
        except IntegrityError as e:
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
            self._fail(dl, e)
            return
        dl.complete = True
        if self.budget is not None and dl.keep:
            self.budget.published(dl.obj)
        elapsed = max(time.monotonic() - dl.started, 1e-6)
        STATS.downloads_ok += 1
        if dl.keep:
            self.bytes_published += dl.obj.size
        DOWNLOAD_SECONDS.observe(elapsed)
        log.info("fetched %s: %d bytes in %.2f s (%.1f MB/s) from S3", dl.obj.uri, dl.obj.size, elapsed,
                 dl.bytes_fetched / elapsed / 1e6,
                 extra={"event": "fetched", "key": dl.obj.key, "bytes": dl.obj.size,
                        "seconds": round(elapsed, 3), "mbps": round(dl.bytes_fetched / elapsed / 1e6, 1),
                        "source": "s3"})
        self._retire(dl)

    async def _restart(self, dl: Download) -> None:
        """Download again into a fresh file (the bytes failed verification; no
        worker thread uses the old file: every block had landed)."""
        old = dl.partial
        try:
            await trio.to_thread.run_sync(self.store.partials.discard, old, limiter=self._io)
            partial = await trio.to_thread.run_sync(self.store.partials.open, dl.obj, self.cfg.block_size,
                                                    limiter=self._io)
        except OSError as e:
            self._fail(dl, StoreError(f"{dl.obj.uri}: cannot restart download: {e.strerror}", e.errno or errno.EIO))
            return
        old_map = dl.fmap
        dl.attach(partial)
        old_map.close()
        old.close()
        self.poke()

    def _fail(self, dl: Download, e: BaseException, discard: bool | None = None) -> None:
        """End a download: readers waiting get the error (its errno), one log
        line names the object and the cause, and the files are cleaned up."""
        if dl.error is not None or dl.finished.is_set():
            return
        STATS.downloads_failed += 1
        dl.cancelled = True
        if isinstance(e, OSError) and not isinstance(e, LazyfsError):
            # A local write failed (ENOSPC most often): say which file and where.
            e = StoreError(f"{dl.obj.uri}: cannot write it to the store {self.store.root.path}: "
                           f"{e.strerror}", e.errno or errno.EIO)
        if isinstance(e, Stopped):
            e = RemoteUnavailable(f"{dl.obj.uri}: download stopped (lazyfs is shutting down)",
                                  bucket=dl.obj.bucket, key=dl.obj.key)
        elif isinstance(e, (ObjectChanged, ObjectNotFound)):
            log.warning("%s: %s during the download; listing again", dl.obj.uri,
                        "changed in the object store" if isinstance(e, ObjectChanged) else "deleted")
            if self.on_changed is not None:
                self.on_changed(dl.obj)
        elif isinstance(e, LazyfsError):
            log.error("download of %s failed: %s", dl.obj.uri, e)
        else:
            log.error("download of %s failed unexpectedly", dl.obj.uri, exc_info=e)
        e.logged = True  # type: ignore[attr-defined]  # readers need not log it again
        dl.error = e
        if discard is None:
            # A changed or deleted object, bad bytes, or a full disk: the
            # partial file is worthless (or in the way).  An interrupted
            # download of the right version is resumed by the next open.
            discard = isinstance(e, (ObjectChanged, ObjectNotFound, IntegrityError)) or \
                (isinstance(e, StoreError) and e.errno == errno.ENOSPC)
        self._spawn(self._cleanup_failed, dl, discard, dl.pin())
        dl.wake()
        self._retire(dl)

    async def _cleanup_failed(self, dl: Download, discard: bool, pin: Pin) -> None:
        with pin:
            try:
                with trio.move_on_after(30):
                    while dl.pins > 1:
                        await trio.sleep(0.05)
                if dl.pins > 1:
                    return  # a stuck thread may still write: leave its file alone
                if discard:
                    await trio.to_thread.run_sync(self.store.partials.discard, dl.partial, limiter=self._io)
                else:
                    await trio.to_thread.run_sync(dl.partial.save_state, frozenset(dl.partial.done),
                                                  limiter=self._io)
            except OSError as e:
                log.warning("%s: cleaning up after a failed download: %s", dl.obj.uri, e.strerror)

    def _discard_later(self, partial: Partial) -> None:
        self._spawn(self._discard, partial)

    async def _discard(self, partial: Partial) -> None:
        try:
            await trio.to_thread.run_sync(self.store.partials.discard, partial, limiter=self._io)
        except OSError as e:
            log.warning("%s: could not remove a temporary download: %s", partial.obj.uri, e.strerror)

    async def _unlock(self, obj: RemoteObject, fd: int) -> None:
        await trio.to_thread.run_sync(self.store.partials.unlock, obj, fd, limiter=self._io)

    def _retire(self, dl: Download) -> None:
        if self._downloads.get(dl.obj.version) is dl:
            del self._downloads[dl.obj.version]
        if dl.lock_fd >= 0:  # other processes may now use (or take over) this version
            self._spawn(self._unlock, dl.obj, dl.lock_fd)
            dl.lock_fd = -1
        dl.finished.set()
        dl.wake()
        dl.maybe_close_fd()
        self.poke()
