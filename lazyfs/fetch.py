"""The download engine: one download per object version, fetched as parallel
ranged GETs straight into a sparse file in the store, served while it arrives,
verified, then published.  (download.py holds one download's state.)

Concurrency (see also docs/concurrency.md):
  * Everything here runs on the trio thread except `_fetch_blocking`,
    `_finish_blocking` and the store calls, which run in worker threads.
  * `Fetcher._downloads` maps an object version to its one live Download.
    `acquire` checks the store and the registry under a per-version trio.Lock,
    so concurrent first opens share one download and never race a publish.
  * A Download's block states, requests and waiters change only on the trio
    thread.  Worker threads only pwrite their own request's byte range into
    the sparse file and post progress back with `TrioToken.run_sync_soon`.
  * One dispatcher task hands out connection slots (a Semaphore of
    `max_connections`) by priority: bytes a reader is blocked on first, then
    downloads someone has open (fewest requests in flight first, so parallel
    readers share), then background prefetch (oldest first).
  * The sparse file's descriptor belongs to the Download and is closed on the
    trio thread only, once no worker thread, task or reader uses it; reads on
    it are served on the trio thread, so a close can never race a read.
Crash cases: a block is recorded on disk only after an fdatasync, so a resumed
download trusts exactly the blocks that are really there; a partial file lives
in .lazyfs/tmp under a name no reader ever opens, so it is never served as whole.
"""

from __future__ import annotations

import logging
import contextlib
import errno
import os
import random
import resource
import threading
import time
from typing import Awaitable, Callable, Iterator, Union

import trio

from lazyfs import verify
from lazyfs.budget import Budget
from lazyfs.coop import ForeignDownload
from lazyfs.download import DONE, Download, Request
from lazyfs.config import FetchConfig
from lazyfs.errors import (IntegrityError, LazyfsError, ObjectChanged, ObjectNotFound, RemoteError,
                           RemoteUnavailable, StoreError)
from lazyfs.namespace import RemoteObject
from lazyfs.remote import Remote, ResponseMeta
from lazyfs.stats import DOWNLOAD_SECONDS, STATS
from lazyfs.store import Identity, LocalCopy, Partial, Store

log = logging.getLogger(__name__)

# First bytes of a request are posted early so a reader of a file's header
# waits for one round trip plus 64 KiB, not for a whole 8 MiB request.
_FIRST_PIECE = 64 * 1024
# Later pieces: a GET in flight holds one piece, so this bounds memory per
# connection; 256 KiB keeps the per-piece overhead (a lock, a pwrite, a
# wake-up of the trio loop) far below the cost of the bytes.
_PIECE = 256 * 1024
# Block completions are made durable (fdatasync + state file) at most this often.
_STATE_EVERY_S = 1.0
_VERIFY_ATTEMPTS = 2
# Long first downloads log their progress this often.
_PROGRESS_EVERY_S = 5.0


LocalOrDownload = Union[LocalCopy, Download, ForeignDownload]


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
        # Versions another process on the same store is downloading (coop.py).
        self._foreign: dict[tuple[str, str, str, int], ForeignDownload] = {}
        self._verified: dict[tuple, bool] = {}  # --verify etag results for unrecorded copies
        self._locks: dict[tuple[str, str, str, int], list] = {}
        self._slots = trio.Semaphore(cfg.max_connections)
        # Threads: one per ranged GET in flight, and a few for the store (opens,
        # publishing, verification), so that ten thousand small prefetched files
        # queueing for the disk never hold up the network, nor the other way round.
        self._net = trio.CapacityLimiter(cfg.max_connections)
        self._io = trio.CapacityLimiter(8)
        self._work = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._closing = False
        # Totals for logs and stats.
        self.bytes_from_s3 = 0
        self.bytes_published = 0

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
            if dl.ndone < dl.nblocks:  # complete ones are being verified and published: let them
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
        dl = self.active(obj) or self._foreign.get((obj.bucket, obj.key, obj.etag, obj.size))
        if dl is not None:
            return "downloading", dl.fetched_bytes
        st = await trio.to_thread.run_sync(self.store.local_state, obj, limiter=self._io)
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
                follower = self._foreign.get(ident)
                if follower is not None:
                    return follower
                may_fetch = not self._closing and not self.offline()
                verdict = await trio.to_thread.run_sync(self._probe_store, obj, may_fetch, limiter=self._io)
                kind = verdict[0]
                if kind in ("local", "linked"):
                    if kind == "linked":
                        STATS.linked_files += 1
                        log.info("%s: same content as a file already in the store; linked, not downloaded",
                                 obj.uri, extra={"event": "linked", "key": obj.key, "bytes": obj.size,
                                                 "source": "store"})
                    return verdict[1]
                if kind == "none":
                    if self._closing:
                        raise RemoteUnavailable(f"{obj.uri}: lazyfs is shutting down")
                    raise RemoteUnavailable(f"{obj.uri} is not in the local cache and the object "
                                            "store is unreachable", bucket=obj.bucket, key=obj.key)
                if kind == "foreign":  # another process on this store is fetching this version
                    follower = ForeignDownload(self, obj)
                    self._foreign[ident] = follower
                    self._spawn(follower.follow)
                    return follower
                lock = verdict[1]
                try:
                    if kind == "partial":
                        return self._begin(obj, verdict[2], lock, background, keep=True)
                    return await self.start_locked(obj, lock, background)
                except BaseException:
                    await trio.to_thread.run_sync(self.store.unlock_download, obj, lock, limiter=self._io)
                    raise
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[ident]

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
                try:
                    self.store.record(copy.fd, Identity.of(obj, "prebaked"))
                except OSError as e:  # a read-only copy we may not stamp: checked again next start
                    log.debug("%s: cannot record the check's result: %s", obj.uri, e.strerror)
            if not ok:
                log.warning("%s: the local copy in the %s does not match the object's %s; "
                            "downloading it again", obj.uri, copy.layer.label, exp.algorithm)
        self._verified[memo_key] = ok
        return ok

    def _probe_store(self, obj: RemoteObject, may_fetch: bool) -> tuple:
        """Worker thread, one hop for the whole open path: a current local copy
        ("local"), the same bytes linked from another path ("linked"), or the
        right to download it ("partial": locked and opened; "locked": locked,
        the cache budget decides the rest), or "foreign" (another process
        downloads it), or "none" (we may not fetch now)."""
        copy = self.store.find_current(obj)
        if copy is not None and copy.state == "prebaked" and self.cfg.verify_prebaked \
                and not self._prebaked_ok(obj, copy):
            os.close(copy.fd)
            copy = None
        if copy is not None:
            return ("local", copy)
        try:
            copy = self.store.materialise(obj)
        except (OSError, StoreError) as e:
            log.warning("%s: could not reuse an identical local file: %s", obj.uri, e)
        if copy is not None:
            return ("linked", copy)
        if not may_fetch:
            return ("none",)
        lock = self.store.lock_download(obj)
        if lock is None:
            return ("foreign",)
        if self.budget is not None:
            return ("locked", lock)
        try:
            return ("partial", lock, self._open_partial(obj))
        except BaseException:
            self.store.unlock_download(obj, lock)
            raise

    def _open_partial(self, obj: RemoteObject) -> Partial:
        try:
            return self.store.open_partial(obj, self.cfg.block_size)
        except OSError as e:
            raise StoreError(f"{obj.uri}: cannot create a download file in the store: {e.strerror}",
                             e.errno) from None

    async def start_locked(self, obj: RemoteObject, lock: int, background: bool) -> Download:
        """Start (or resume) the download of `obj`, holding its store lock."""
        keep = await self.budget.reserve(obj) if self.budget is not None else True
        partial = await trio.to_thread.run_sync(self._open_partial, obj, limiter=self._io)
        return self._begin(obj, partial, lock, background, keep)

    def _begin(self, obj: RemoteObject, partial: Partial, lock: int, background: bool, keep: bool) -> Download:
        if self._closing:  # shutdown began while the store was being prepared (caller unlocks)
            os.close(partial.fd)
            raise RemoteUnavailable(f"{obj.uri}: lazyfs is shutting down", bucket=obj.bucket, key=obj.key)
        dl = Download(self, obj, partial, background, keep)
        dl.lock_fd = lock
        self._downloads[dl.ident] = dl
        if dl.partial.done:
            log.info("%s: resuming download, %d of %d blocks already on disk", obj.uri,
                     len(dl.partial.done), dl.nblocks)
        if obj.size == 0 or dl.ndone == dl.nblocks:
            dl.state[:] = bytes([DONE]) * dl.nblocks
            dl.ndone = dl.nblocks
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
            dl, req = picked
            dl.threads += 1
            self._spawn(self._run_request, dl, req)

    def _pick(self) -> tuple[Download, Request] | None:
        if self._closing:
            return None
        live = [dl for dl in self._downloads.values() if dl.error is None and not dl.cancelled]
        for dl in live:  # 1: a reader is blocked on these bytes
            req = dl.next_request(demanded_only=True)
            if req is not None:
                return dl, req
        fg = sorted((dl for dl in live if not dl.background or dl.readers > 0),
                    key=lambda d: (len(d.requests), d.started))
        bg = sorted((dl for dl in live if dl.background and dl.readers <= 0), key=lambda d: d.started)
        for dl in fg + bg:  # 2: open files, sharing; 3: prefetch, oldest first
            req = dl.next_request()
            if req is not None:
                return dl, req
        return None

    async def _run_request(self, dl: Download, req: Request) -> None:
        try:
            await trio.to_thread.run_sync(self._fetch_blocking, dl, req, limiter=self._net,
                                          abandon_on_cancel=True)
        except BaseException as e:
            dl.threads -= 1
            self._slots.release()
            dl.abandon(req)
            if isinstance(e, Exception):
                self._fail(dl, e)
            dl.maybe_close_fd()
            if not isinstance(e, Exception):
                raise
            return
        dl.threads -= 1
        self._slots.release()
        self._landed(dl, req, req.end - req.start)
        self.poke()
        if dl.ndone == dl.nblocks:
            self._spawn(self._finish, dl)

    def _fetch_blocking(self, dl: Download, req: Request) -> None:
        """Worker thread: GET one request's bytes into the sparse file, resuming
        within it after a broken body (botocore retries only until the headers)."""
        pos, end = req.start, req.end
        block = dl.block_size
        attempt = 0
        token = self._token
        assert token is not None
        while True:
            if dl.cancelled:
                raise _Stopped()
            stream = self.remote.get_range(dl.obj, pos, end)  # RemoteError: already retried
            if dl.meta is None or stream.meta.checksum is not None:
                dl.meta = stream.meta  # read at verification time, on the trio side
            try:
                piece = _FIRST_PIECE
                post_at = pos + piece  # the first bytes go to a waiting reader at once
                while pos < end:
                    if dl.cancelled:
                        raise _Stopped()
                    data = stream.read(min(piece, end - pos))
                    piece = _PIECE
                    with dl.write_lock:
                        _pwrite_all(dl.fd, data, pos)
                    pos += len(data)
                    if post_at <= pos < end:
                        # Then once per block: readers wait for whole blocks
                        # anyway, and each post wakes the trio thread.
                        token.run_sync_soon(self._landed, dl, req, pos - req.start)
                        post_at = (pos // block + 1) * block
                return
            except RemoteUnavailable as e:
                attempt += 1
                if attempt >= self.cfg.chunk_attempts:
                    raise
                delay = min(8.0, 0.2 * 2 ** attempt) * random.uniform(0.5, 1.5)
                log.info("%s: %s; retrying bytes %d-%d in %.1f s (attempt %d of %d)", dl.obj.uri, e,
                         pos, end - 1, delay, attempt + 1, self.cfg.chunk_attempts)
                STATS.bump("retries")
                time.sleep(delay)
            finally:
                stream.close()

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
            self._maybe_save_state(dl)
        now = time.monotonic()
        if now - dl.last_progress_log >= _PROGRESS_EVERY_S and dl.readers > 0 and not dl.background:
            dl.last_progress_log = now
            rate = dl.bytes_fetched / max(now - dl.started, 1e-6)
            log.info("downloading %s: %.0f%% (%.1f of %.1f MiB, %.1f MB/s)", dl.obj.uri,
                     100.0 * dl.ndone / dl.nblocks, dl.fetched_bytes / 2**20, dl.obj.size / 2**20, rate / 1e6)

    def _maybe_save_state(self, dl: Download) -> None:
        """Record finished blocks for a resume, at most once per _STATE_EVERY_S
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
                await trio.to_thread.run_sync(dl.partial.save_state, snapshot, limiter=self._io)
        except OSError as e:
            log.warning("%s: could not record download progress: %s", dl.obj.uri, e.strerror)
            snapshot = frozenset(dl.partial.done)  # do not retry in a loop
        finally:
            dl._saving = False
            dl.threads -= 1
            dl.maybe_close_fd()
        if not dl.finished.is_set() and dl.partial.done != snapshot:
            self._maybe_save_state(dl)  # blocks finished while this save ran

    # -- completion ---------------------------------------------------------------------

    async def _finish(self, dl: Download) -> None:
        dl.threads += 1
        try:
            await trio.to_thread.run_sync(self._finish_blocking, dl, limiter=self._io)
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

    def _finish_blocking(self, dl: Download) -> None:
        with _lower_priority():
            self._verify_and_publish(dl)

    def _verify_and_publish(self, dl: Download) -> None:
        if dl.obj.size:
            exp = self._expectation(dl.obj, dl.meta)
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

    def _expectation(self, obj: RemoteObject, meta: ResponseMeta | None = None) -> verify.Expectation | None:
        """What S3 vouches for.  The GETs' own headers usually say enough; a HEAD
        is sent only when the listing shows a checksum the GETs did not carry
        (ranged responses never do), or when no GET was made."""
        checksum = meta.checksum if meta else None
        etag_is_md5 = meta.etag_is_md5 if meta else None
        if etag_is_md5 is None or (checksum is None and obj.checksum_algorithm):
            info = self.remote.head(obj.bucket, obj.key, etag=obj.etag)
            checksum, etag_is_md5 = info.checksum, info.etag_is_md5
        return verify.choose(obj.etag, checksum, etag_is_md5, lambda: self.remote.part_size(obj))

    async def _restart(self, dl: Download) -> None:
        old_fd = dl.fd
        try:
            await trio.to_thread.run_sync(self.store.discard, dl.partial, limiter=self._io)
            partial = await trio.to_thread.run_sync(self.store.open_partial, dl.obj, self.cfg.block_size,
                                                    limiter=self._io)
        except OSError as e:
            self._fail(dl, StoreError(f"{dl.obj.uri}: cannot restart download: {e.strerror}", e.errno))
            return
        old_map = dl.fmap
        dl._attach(partial)
        old_map.close()
        os.close(old_fd)  # no thread uses it: every chunk had finished
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
        if isinstance(e, _Stopped):
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
        dl.threads += 1  # pinned until the cleanup below is done with the file
        self._spawn(self._cleanup_failed, dl, discard)
        dl.wake()
        self._retire(dl)

    async def _cleanup_failed(self, dl: Download, discard: bool) -> None:
        try:
            with trio.move_on_after(30):
                while dl.threads > 1:
                    await trio.sleep(0.05)
            if dl.threads > 1:
                return  # a stuck thread may still write: leave its file alone
            if discard:
                await trio.to_thread.run_sync(self.store.discard, dl.partial, limiter=self._io)
            else:
                await trio.to_thread.run_sync(dl.partial.save_state, frozenset(dl.partial.done),
                                              limiter=self._io)
        except OSError as e:
            log.warning("%s: cleaning up after a failed download: %s", dl.obj.uri, e.strerror)
        finally:
            dl.threads -= 1
            dl.maybe_close_fd()

    async def _unlock(self, obj: RemoteObject, fd: int) -> None:
        await trio.to_thread.run_sync(self.store.unlock_download, obj, fd, limiter=self._io)

    def discard_later(self, partial: Partial) -> None:
        self._spawn(self._discard, partial)

    async def _discard(self, partial: Partial) -> None:
        try:
            await trio.to_thread.run_sync(self.store.discard, partial, limiter=self._io)
        except OSError as e:
            log.warning("%s: could not remove a temporary download: %s", partial.obj.uri, e.strerror)

    def _retire(self, dl: Download) -> None:
        if self._downloads.get(dl.ident) is dl:
            del self._downloads[dl.ident]
        if dl.lock_fd >= 0:  # other processes may now use (or take over) this version
            self._spawn(self._unlock, dl.obj, dl.lock_fd)
            dl.lock_fd = -1
        dl.finished.set()
        dl.wake()
        dl.maybe_close_fd()
        self.poke()


class _Stopped(Exception):
    """A worker thread noticed its download was cancelled."""


@contextlib.contextmanager
def _lower_priority() -> Iterator[None]:
    """Hash a finished download at a lower CPU priority than the downloads and
    readers still running (this thread only), when its priority can be
    restored afterwards: raising a nice value is always allowed, lowering it
    back needs CAP_SYS_NICE or RLIMIT_NICE, which containers do not grant by
    default.  Without either, the thread keeps its priority."""
    tid = threading.get_native_id()
    old = os.getpriority(os.PRIO_PROCESS, tid)
    if not _may_renice_to(old):
        yield
        return
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, old + 10))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, tid, old)


_CAP_SYS_NICE = 23


def _may_renice_to(nice: int) -> bool:
    """May this process lower a thread's nice value back to `nice`?"""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        caps = 0
    if caps & (1 << _CAP_SYS_NICE):
        return True
    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    return soft == resource.RLIM_INFINITY or 20 - soft <= nice


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
