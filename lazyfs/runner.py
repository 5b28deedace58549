"""Running the downloads of this process: their requests (worker threads
fetching ranged GETs), the resume record, verification and publishing,
failure and clean-up.  The registry (fetch.Fetcher) hands a download here
when it starts and is told when it retires.  Every rule of
docs/concurrency.md about threads, pins and trio-side state is kept here.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import trio

from lazyfs import alongside
from lazyfs.budget import Budget
from lazyfs.completion import UNVERIFIED, verify_and_publish_blocking
from lazyfs.config import FetchConfig
from lazyfs.download import RECORD_FOLLOWED_S, Download, Request
from lazyfs.errors import (
    IntegrityError,
    LazyfsError,
    NoThread,
    ObjectChanged,
    ObjectNotFound,
    RemoteUnavailable,
    ShuttingDown,
    StoreError,
)
from lazyfs.exhausted import strerror
from lazyfs.leftovers import Leftovers
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import ObjectStore, ResponseMeta
from lazyfs.pin import Handoff, Pin
from lazyfs.probe import open_partial_file
from lazyfs.progress import ProgressLines
from lazyfs.quiet import Quiet, reader_request
from lazyfs.ranged_get import RangeJob, Stopped, fetch_range_blocking
from lazyfs.repeats import RepeatedLines, shape
from lazyfs.stats import STATS, TIMINGS
from lazyfs.store import Store
from lazyfs.threads import MUST, run_sync
from lazyfs.wording import cause, quoted

log = logging.getLogger(__name__)
T = TypeVar("T")

_VERIFY_ATTEMPTS = 2
# How long a finished download waits for its running digest before it hashes the whole file itself.
_HASH_WAIT_S = 30.0
# How long readers of a replaced object wait for its new version to be known.
_RECHECK_S = 5.0
# Threads for resume records and discards, and for hashing: CPU-bound, half the CPUs (2 to 8) leaves the rest to
# the network's, and lets a multipart ETag's parts (~0.7 GB/s each) keep up with a fast NIC (alongside._hash_parts).
_BULK_THREADS = 4
_VERIFY_THREADS = max(2, min(8, len(os.sched_getaffinity(0)) // 2))


@dataclass
class Hooks:
    """What the rest of the process wants to hear from the engine."""

    # An object whose downloaded bytes failed verification: the kernel should drop any pages of them
    # it cached for readers (started, never waited for: kernelcache.py says why).
    on_bad_data: Callable[[RemoteObject], None] = lambda obj: None
    # An object that changed or vanished in the object store: find its new
    # version and tell the kernel (awaited before the old one's readers fail).
    on_changed: Callable[[RemoteObject], Awaitable[None]] | None = None
    # The cache budget (--cache-max-size), told of every published file.
    budget: Budget | None = None
    # Is this the version the listing shows now?  (A rollback in a versioned
    # bucket makes an older Last-Modified current again: it must be placed.)
    is_current: Callable[[RemoteObject], bool] = lambda obj: False
    # An object this process must not fetch (a locked version the bucket no
    # longer has, pinned.py): its opens fail at once with this error unless
    # a current local copy exists.
    refuse: Callable[[RemoteObject], LazyfsError | None] = lambda obj: None
    # Told of every ranged GET in flight: the first listing waits for them.
    quiet: Quiet | None = None


class Runner:
    def __init__(self, remote: ObjectStore, store: Store, cfg: FetchConfig, hooks: Hooks, *, origin: str,
                 spawn: Callable[..., None], post: Callable[..., None], poke: Callable[[], None],
                 release_slot: Callable[[], None], retired: Callable[[Download], None],
                 meta: trio.CapacityLimiter) -> None:
        self.remote = remote
        self.store = store
        self.cfg = cfg
        self.hooks = hooks
        self.origin = origin  # recorded with each published file (see identity.Identity)
        self._spawn = spawn  # start a task in the engine's nursery
        self._post = post  # from a worker thread: run a function on the trio thread
        self.poke = poke  # there may be bytes to fetch: the dispatcher should look
        self._release_slot = release_slot  # a request ended: the dispatcher may start another
        self._retired = retired  # a download finished: the registry forgets it
        # Thread pools (docs/concurrency.md): opens and metadata never queue
        # behind bulk work, and bulk work never behind the network.
        self._net = trio.CapacityLimiter(cfg.max_connections)  # one thread per ranged GET
        self._meta = meta  # quick store work on the open path, shared with the registry
        self.bulk = trio.CapacityLimiter(_BULK_THREADS)  # fdatasync of resume records, discards, closes
        self._verify = trio.CapacityLimiter(_VERIFY_THREADS)  # hashing and publishing finished files
        # A request's bytes into the file (crt.CrtTransfer.fetch with the CRT); blocking, in a network thread.
        self.fetch_range: Callable[[RangeJob], None] = functools.partial(fetch_range_blocking, remote)
        # Each open of a file whose GETs are refused starts a download that fails: its line once a minute.
        self.failure_lines = RepeatedLines()
        self.progress = ProgressLines()  # `downloading ... %` lines (progress.py)
        self.bytes_from_s3 = 0  # totals for logs and stats
        self.bytes_published = 0
        # Store locks given back, failed downloads' files (the record saved, or removed), discards.
        self.leftovers = Leftovers(store, spawn, self.bulk, meta)
        self.unlocking = self.leftovers.unlocking  # (versions whose lock is being given back: Fetcher.acquire)
        self.discard_later = self.leftovers.discard_later

    # -- requests ---------------------------------------------------------------------

    def start_request(self, dl: Download, req: Request) -> None:
        """From the dispatcher: fetch `req` in a worker thread, its download pinned."""
        self._spawn(self._run_request, dl, req, Handoff(dl.pin()))

    async def _run_request(self, dl: Download, req: Request, handoff: Handoff) -> None:
        job = RangeJob(obj=dl.obj, fd=dl.fd, write_turns=dl.write_turns, start=req.start, end=req.end,
                       block_size=dl.block_size, attempts=self.cfg.chunk_attempts,
                       direct=(lambda: dl.served == 0) if self.cfg.store_writes == "direct" else lambda: False,
                       sums=dl.sums, cancelled=lambda: dl.cancelled,
                       posted=lambda n: self._post(self._landed, dl, req, n),
                       got_meta=lambda meta: self._post(self._got_meta, dl, meta),
                       # The pace times the attempt that delivers, not the failures and waits before (partpace.py).
                       attempting=lambda first_byte: self._post(dl.pace.attempting, req, first_byte, time.monotonic()),
                       stalled=lambda n, s: self._post(dl.pace.stalled, req, n, s))
        try:
            with reader_request(self.hooks.quiet):
                await run_sync(self._in_thread, functools.partial(self.fetch_range, job), handoff,
                               limiter=self._net, abandon_on_cancel=True)
        except BaseException as e:
            handoff.task_gives_up()
            self._release_slot()
            dl.abandon(req)
            if not isinstance(e, Exception):
                raise
            if isinstance(e, (ObjectChanged, ObjectNotFound)):
                await self._object_changed(dl)
            self.fail(dl, e)
            return
        self._release_slot()
        self._landed(dl, req, req.end - req.start)
        if dl.all_done:
            self.finish_once(dl)

    def finish_once(self, dl: Download) -> None:
        """Verify and publish, once per file: the last block may land through a
        worker's progress before two requests' tasks both see it done."""
        if not dl.finishing and dl.error is None and not dl.finished.is_set():
            dl.finishing = True
            self._spawn(self.finish, dl)

    def _in_thread(self, work: Callable[[], T], handoff: Handoff) -> T | None:
        """Worker thread: `work`, holding the pin the task handed over."""
        if not handoff.thread_starts():
            return None  # the task was cancelled first and released the pin
        try:
            return work()
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
        ramp = dl.ramp
        done = dl.progress(req, filled)
        if dl.ramp > ramp:
            self.poke()  # the first bytes opened the slow start: the sweep's other requests go now
        if dl.wants_order and dl.contiguous >= 8:
            dl.wants_order = False
            self._spawn(alongside.learn_order, dl, self.poke)
        if done:
            dl.partial.done.update(done)
            self._save_state_soon(dl)
        self.progress.landed(dl, time.monotonic())  # a `downloading ... %` line where it means something

    def _save_state_soon(self, dl: Download) -> None:
        """Record finished blocks for a resume, at most once per Download.record_every()
        (a save that comes too soon is deferred, not dropped)."""
        if not dl.saving:
            dl.saving = True
            self._spawn(self._save_state, dl, dl.pin())

    async def _save_state(self, dl: Download, pin: Pin) -> None:
        with pin:
            try:
                # Looked at again while waiting: a follower may ask for a faster pace.
                while (wait := dl.state_saved_at + dl.record_every() - time.monotonic()) > 0:
                    await trio.sleep(min(wait, RECORD_FOLLOWED_S))
                snapshot = frozenset(dl.partial.done)
                if not dl.finished.is_set():
                    dl.state_saved_at = time.monotonic()
                    await run_sync(dl.partial.save_state, snapshot, limiter=self.bulk, patience=MUST)
            except OSError as e:
                log.warning("%s: could not record download progress: %s", quoted(dl.obj.uri), strerror(e))
                snapshot = frozenset(dl.partial.done)  # do not retry in a loop
            finally:
                dl.saving = False
        if not dl.finished.is_set() and dl.partial.done != snapshot:
            self._save_state_soon(dl)  # blocks finished while this save ran

    # -- completion ---------------------------------------------------------------------

    async def hash_along(self, dl: Download) -> None:
        await alongside.hash_along(dl, self.remote, self.bulk, self._verify)

    async def finish(self, dl: Download) -> None:
        with trio.move_on_after(_HASH_WAIT_S):
            await dl.hashed.wait()  # the last piece of the digest, if it is being kept
        publish = functools.partial(verify_and_publish_blocking, self.remote, self.store, dl.partial, dl.meta,
                                    keep=dl.keep, origin=self.origin, cancelled=lambda: dl.cancelled,
                                    hashed=dl.digest, current=self.hooks.is_current(dl.obj))
        handoff = Handoff(dl.pin())
        try:
            # Abandoned on cancel (a shutdown must not wait for a 100 GiB
            # hash): the thread keeps its pin, sees `cancelled` at its next
            # read and ends; the next start verifies again.
            finished = await run_sync(self._in_thread, publish, handoff, limiter=self._verify, abandon_on_cancel=True)
        except BaseException as e:
            handoff.task_gives_up()
            if not isinstance(e, Exception):
                raise
            await self._finish_failed(dl, e)
            return
        if finished is None:  # only when cancelled before the thread started
            self.fail(dl, Stopped())
            return
        dl.verified = finished.verified
        if dl.keep and not finished.placed:
            # The store said why (a newer version there, or a folder in the way: once per key).
            log.debug("%s: served its readers and was not kept in the store", quoted(dl.obj.uri))
            dl.keep = False
            if self.hooks.budget is not None:
                self.hooks.budget.released(dl.obj)  # its room was reserved for a file not kept
        self._published(dl, finished.not_kept)

    async def _finish_failed(self, dl: Download, e: Exception) -> None:
        if isinstance(e, (ObjectChanged, ObjectNotFound)):
            await self._object_changed(dl)
        if isinstance(e, IntegrityError):
            dl.verify_attempts += 1
            dl.disown()  # before the kernel's pages go: no bad byte is served after the drop
            self.hooks.on_bad_data(dl.obj)
            if dl.verify_attempts < _VERIFY_ATTEMPTS and not dl.cancelled:
                log.warning("%s; downloading it again", e)
                await self._restart(dl)
                return
            self.fail(dl, e, discard=True)
            return
        self.fail(dl, e)

    async def _object_changed(self, dl: Download) -> None:
        """Before the readers of the old version get ESTALE: let the mount
        learn the new version and tell the kernel, so their next open reads
        it whole.  Once per download, and bounded: the readers are waiting.
        Every request that meets the change waits for it, not only the
        first: another one failing the readers sooner would send their next
        open to the old version again."""
        if self.hooks.on_changed is None:
            return
        with trio.move_on_after(_RECHECK_S):
            if dl.changing is not None:
                await dl.changing.wait()
                return
            dl.changing = trio.Event()
            try:
                await self.hooks.on_changed(dl.obj)
            finally:
                dl.changing.set()

    def _published(self, dl: Download, not_kept: str = "") -> None:
        dl.complete = True
        if self.hooks.budget is not None and dl.keep:
            self._spawn(self.hooks.budget.published, dl.obj, dl.background)  # (no reader opened it)
        elapsed = max(time.monotonic() - dl.started, 1e-6)
        STATS.downloads_ok += 1
        if dl.keep:
            self.bytes_published += dl.obj.size
        TIMINGS.download(elapsed)
        checked = dl.verified not in ("", UNVERIFIED)
        came = "from S3" if dl.bytes_fetched >= dl.obj.size else f"{dl.bytes_fetched} of them from S3, the rest resumed"
        how = (f"verified by {dl.verified}" if checked else "unverified") + ("" if dl.keep else (
            f"; not kept ({not_kept or 'the store did not take it'}): served to its readers only"))
        log.info("fetched %s: %d bytes in %.2f s (%.1f MB/s) %s, %s", quoted(dl.obj.uri), dl.obj.size, elapsed,
                 dl.bytes_fetched / elapsed / 1e6, came, how,
                 extra={"event": "fetched", "key": dl.obj.key, "bytes": dl.obj.size, "kept": dl.keep,
                        "seconds": round(elapsed, 3), "mbps": round(dl.bytes_fetched / elapsed / 1e6, 1),
                        "source": "s3", "verified": dl.verified or UNVERIFIED})
        self.retire(dl)

    async def _restart(self, dl: Download) -> None:
        """Download again into a fresh file (the bytes failed verification).
        The old file is unlinked and closed first, so a store with room for
        one copy of the object is enough."""
        with trio.move_on_after(30):
            while dl.pins:  # a resume-record save may still be writing
                await trio.sleep(0.02)
        if dl.pins:
            self.fail(dl, StoreError(f"{quoted(dl.obj.uri)}: cannot restart the download: its file is still in use"))
            return
        old = dl.partial
        try:
            await run_sync(self.store.partials.discard, old, limiter=self.bulk)
            dl.detach()
            partial = await run_sync(open_partial_file, self.store, dl.obj, self.cfg.block_size, limiter=self._meta)
        except Exception as e:  # ENOSPC most often: the readers get it, the mount goes on
            self.fail(dl, e, discard=True)
            return
        dl.attach(partial)
        self._spawn(self.hash_along, dl)
        self.poke()

    def fail(self, dl: Download, e: BaseException, discard: bool | None = None) -> None:
        """End a download: readers waiting get the error (its errno), one log
        line names the object and the cause, and the files are cleaned up."""
        if dl.error is not None or dl.finished.is_set():
            return
        STATS.downloads_failed += 1
        dl.cancelled = True
        if self.hooks.budget is not None and dl.keep:
            self.hooks.budget.released(dl.obj)
        if isinstance(e, OSError) and not isinstance(e, LazyfsError):
            # A local write failed (ENOSPC most often): say which file and where.
            e = StoreError(f"{quoted(dl.obj.uri)}: cannot write it to the store {self.store.root.path}: "
                           f"{strerror(e)}", e.errno or errno.EIO)
        if isinstance(e, Stopped):
            e = ShuttingDown(f"{quoted(dl.obj.uri)}: download stopped (lazyfs is shutting down)",
                             bucket=dl.obj.bucket, key=dl.obj.key)
        elif isinstance(e, (ObjectChanged, ObjectNotFound)):  # (with what showed it, if not a 412: answers.py)
            how = ("changed in the object store", e.detail) if isinstance(e, ObjectChanged) else ("not found (404)", "")
            log.warning("%s: %s during the download%s", quoted(dl.obj.uri), *how)
        elif isinstance(e, NoThread):
            pass  # threads.py said it, once a minute for the whole process
        elif isinstance(e, LazyfsError):  # the same failure of the file again: a line a minute (repeats.py)
            line = f"download of {(where := quoted(dl.obj.uri))} failed: {cause(str(e), where)}"  # the file named once
            # Fetched ahead, no reader (yet): S3 unreachable is a WARNING; a reader's open then says its own line.
            ahead = dl.background and isinstance(e, RemoteUnavailable)
            self.failure_lines.log(log, min(e.log_level, logging.WARNING) if ahead else e.log_level,
                                   (e.errno, shape(line), ahead), "%s", line)  # (its name kept in the key)
        else:
            log.error("download of %s failed unexpectedly", quoted(dl.obj.uri), exc_info=e)
        e.logged = True  # type: ignore[attr-defined]  # readers need not log it again
        dl.error = e
        if discard is None:
            # A changed or deleted object, bad bytes, or a full disk: the
            # partial file is worthless (or in the way).  An interrupted
            # download of the right version is resumed by the next open.
            discard = isinstance(e, (ObjectChanged, ObjectNotFound, IntegrityError)) or \
                (isinstance(e, StoreError) and e.errno == errno.ENOSPC)
        if discard:
            self.store.partials.condemn(dl.partial)
        self.leftovers.after_failure(dl, discard)
        dl.wake()
        self.retire(dl)

    def retire(self, dl: Download) -> None:
        self._retired(dl)
        if dl.lock_fd >= 0:
            self.leftovers.unlock(dl.obj, dl.lock_fd)
            dl.lock_fd = -1
        dl.finished.set()
        dl.progressed.set()  # its tasks waiting for blocks look again and end (alongside.py)
        dl.wake()
        dl.maybe_close_fd()
        self.poke()
