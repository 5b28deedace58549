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
import functools
import logging
import os
from typing import AsyncIterator, Awaitable, Callable

import trio

from lazyfs import modelaware, wording
from lazyfs.budget import Budget
from lazyfs.config import FetchConfig, RemoteConfig, default_of
from lazyfs.coop import ForeignDownload, hear_wants
from lazyfs.dispatch import Dispatcher
from lazyfs.download import Download
from lazyfs.errors import LazyfsError, RemoteUnavailable, ShuttingDown, StoreError
from lazyfs.filemap import PageBudget
from lazyfs.filestate import FileState
from lazyfs.namespace import RemoteObject, Version
from lazyfs.objectstore import ObjectStore
from lazyfs.pagecache import Prefaulter
from lazyfs.partials import Partial
from lazyfs.partpace import Limits
from lazyfs.probe import (
    Fetch,
    Foreign,
    LateVerdict,
    Local,
    PrebakedCheck,
    Unavailable,
    Verdict,
    open_partial_file,
    probe_store,
    release,
    released,
)
from lazyfs.ranged_get import RangeJob, Stopped
from lazyfs.runner import Hooks, Runner
from lazyfs.stats import STATS
from lazyfs.store import LocalCopy, LocalState, Store
from lazyfs.supervise import forever, once
from lazyfs.threads import MUST, run_else, run_sync, start_soon
from lazyfs.transfer import Transfer

log = logging.getLogger(__name__)

# Quick store work on the open path (probes, opening a download's file, xattr
# states, locks) in flight at once; bulk work has its own threads (runner.py).
_META_THREADS = 8
# An operator's question about a file (its xattrs, so `lazyfs status`) waits
# this long for the store, then fails with EIO: a request the kernel has sent
# waits for its answer whatever signal its process gets, so one stuck on a hung
# store would hold `getfattr` or a readiness probe for ever, unkillably.
STATE_WAIT_S = 5.0

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


class Fetcher:
    def __init__(self, remote: ObjectStore, store: Store, cfg: FetchConfig, pages: PageBudget | None = None,
                 origin: str = "fetch", fetch_range: Callable[[RangeJob], None] | None = None,
                 pinned: bool = False, stall_s: float = default_of(RemoteConfig, "read_timeout")) -> None:
        """`stall_s`: --read-timeout, after which crt.py gives up on a request no byte of which arrived."""
        self.remote = remote
        self.store = store
        self.cfg = cfg
        self.pages = pages or PageBudget()
        self.origin = origin  # recorded with each published file (see identity.Identity)
        self.hooks = Hooks()
        # True while the object store is known to be unreachable (offline
        # start): a file with no local copy then fails at once.
        self.offline: Callable[[], bool] = lambda: False
        self._downloads: dict[Version, Download] = {}
        self._foreign: dict[Version, ForeignDownload] = {}  # run by another process (coop.py)
        self._locks = _VersionLocks()
        # (public: an open asks it whether a copy it served was refused since; the mount gives it `listings`)
        self.prebaked = None if not (cfg.verify_prebaked or pinned) else PrebakedCheck(
            remote, store, pinned, etag_is_md5=cfg.link_same_etag)  # (--no-etag-check: ETags are not MD5s)
        crt = cfg.transfer_client == "crt"
        self._limits = Limits(part_blocks=max(1, cfg.part_size // cfg.block_size),
                              max_requests=cfg.max_connections, read_deadline=cfg.read_deadline,
                              whole_parts=crt, unseen_s=min(cfg.read_deadline, stall_s) if crt else 0.0)
        # Threads: one per ranged GET in flight (runner.py), and a few for the
        # store, so that ten thousand small prefetched files queueing for the
        # disk never hold up the network, nor the other way round.
        self._meta = trio.CapacityLimiter(_META_THREADS)
        # (a lambda: the runner is made next, and needs the dispatcher's slots)
        self._dispatcher = Dispatcher(cfg.max_connections, self._downloads.values,
                                      lambda dl, req: self.runner.start_request(dl, req))  # noqa: PLW0108
        self.runner = Runner(remote, store, cfg, self.hooks, origin=origin, spawn=self._spawn, post=self._post,
                             poke=self.poke, release_slot=self._dispatcher.release, retired=self._retired,
                             meta=self._meta)
        if fetch_range is not None:
            self.runner.fetch_range = fetch_range
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self.pagecache = Prefaulter(self._spawn, close=self.close_fd)

    @property
    def budget(self) -> Budget | None:
        return self.hooks.budget

    @property
    def bytes_from_s3(self) -> int:
        return self.runner.bytes_from_s3

    @property
    def bytes_published(self) -> int:
        return self.runner.bytes_published

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
            nursery.start_soon(forever, "wants", functools.partial(
                hear_wants, self.store, self._downloads.values, self._meta, self.poke))
            task_status.started()
            await forever("dispatcher", self._dispatcher.run)

    async def close(self, grace: float = 2.0) -> None:
        """Stop fetching: readers still waiting get EIO, worker threads stop at
        their next piece, and the blocks on disk are recorded for a resume.
        Waits at most `grace` seconds for that."""
        self._dispatcher.closing = True
        live = list(self._downloads.values())
        for dl in live:  # a verification running stops too: the next start verifies again
            self.runner.fail(dl, Stopped())
        for follower in list(self._foreign.values()):
            follower.stop()
        with trio.move_on_after(grace):
            for dl in live:
                while dl.pins:
                    await trio.sleep(0.02)

    def poke(self) -> None:
        self._dispatcher.poke()

    def transfer(self, obj: RemoteObject) -> Transfer | None:
        """The download of `obj` running here, or in another process this one follows."""
        return self.active(obj) or self._foreign.get(obj.version)

    async def state_of(self, obj: RemoteObject) -> LocalState:
        """What is on disk for `obj`, for operators (a download here is DOWNLOADING); never fetches."""
        if (transfer := self.transfer(obj)) is not None:
            return LocalState(FileState.DOWNLOADING, "store", transfer.fetched_bytes)
        checked = self.prebaked.checked if self.prebaked is not None else None  # (--verify etag, pinned)
        with trio.move_on_after(STATE_WAIT_S):  # abandoned then: it holds no descriptor once it returns
            return await run_sync(self.store.local_state, obj, checked, limiter=self._meta, abandon_on_cancel=True)
        raise _silent_store(STATE_WAIT_S, obj)

    def warm(self, obj: RemoteObject) -> None:
        """Start fetching `obj` in the background (no reader waits for it yet),
        unless the cache budget has no room for it beside the files in use."""
        if self._nursery is None or self.active(obj) is not None or self.closing:
            return
        if self.budget is None or self.budget.room_ahead(obj, say=False):
            self._spawn(self._warm, obj)
        elif self.budget.first_refusal(obj):  # said once, unless it needs no room (a baked or prebaked copy)
            self._spawn(self.budget.say_no_room, obj, self.state_of)

    def warm_after(self, current: Transfer, obj: RemoteObject) -> None:
        """Start fetching `obj` once `current` has nothing left to request.
        Earlier, the two would share the connections and the CPU while a
        reader still waits for `current` (a reader of one shard would pay for
        the next); later, the connections would idle as `current`'s last
        requests finish one by one."""
        if self._nursery is not None and not self.closing:
            self._spawn(self._warm_after, current, obj)

    async def _warm_after(self, current: Transfer, obj: RemoteObject) -> None:
        await current.wait_drained()
        self.warm(obj)

    async def _warm(self, obj: RemoteObject) -> None:
        try:
            got = await self.acquire(obj, background=True)
        except LazyfsError as e:
            log.debug("%s: not fetched ahead: %s", wording.quoted(obj.uri), e)
            return
        if isinstance(got, LocalCopy):
            os.close(got.fd)

    def close_fd(self, fd: int) -> None:
        """Close a descriptor in a worker thread when it is the last link of an unlinked file (the
        close frees its blocks: seconds for 100 GiB on some filesystems); inline otherwise."""
        try:
            unlinked = os.fstat(fd).st_nlink == 0
        except OSError:
            unlinked = False
        if unlinked and self._nursery is not None:
            self._spawn(self._close_in_thread, fd)
        else:
            os.close(fd)

    async def _close_in_thread(self, fd: int) -> None:
        try:
            await run_sync(os.close, fd, limiter=self.runner.bulk, patience=MUST)
        except trio.Cancelled:
            # Shutdown, before a thread took it (a started one is not cancelled): close it here.
            os.close(fd)
            raise

    def _bad_data(self, obj: RemoteObject) -> None:
        self.hooks.on_bad_data(obj)  # the hook set now, not when the follower was made

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start an engine task; an unexpected exception in it is logged and counted (supervise.py), never
        allowed to end the nursery (the mount).  Dropped once the nursery is closed (stopping): a thread's
        last word (a pin released, posted to the trio thread) may come then, and raising would crash trio."""
        assert self._nursery is not None, "Fetcher.run() is not running"
        with contextlib.suppress(RuntimeError):  # "Nursery is closed to new arrivals"
            self._nursery.start_soon(once, getattr(fn, "__name__", "engine task"), fn, *args)

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
            if (unlocking := self.runner.unlocking.get(obj.version)) is not None:
                await unlocking.wait()  # its lock is ours, given back: not "another lazyfs process"
            refused = self.hooks.refuse(obj)
            probe = functools.partial(probe_store, self.store, obj,
                                      may_fetch=refused is None and not self.closing and not self.offline(),
                                      open_partial=self.budget is None, block_size=self.cfg.block_size,
                                      check_prebaked=self.prebaked, may_link=self.cfg.link_same_etag)
            verdict = await self._probe(obj, probe)
            if isinstance(verdict, Local):
                if verdict.copy.linked:
                    STATS.linked_files += 1
                    log.info("%s: same content as a file already in the store; linked, not downloaded",
                             wording.quoted(obj.uri),
                             extra={"event": "linked", "key": obj.key, "bytes": obj.size, "source": "store"})
                    if self.budget is not None and verdict.copy.fetched:
                        self.budget.linked(obj)  # in the store again: it counts (budget.py)
                return verdict.copy
            if isinstance(verdict, Unavailable):
                if refused is not None:
                    raise refused
                if self.closing:
                    raise ShuttingDown(f"{wording.quoted(obj.uri)}: lazyfs is shutting down", bucket=obj.bucket,
                                       key=obj.key)
                # (offline: S3 unreachable, or no AWS credentials to ask it with; the start's line says which)
                raise RemoteUnavailable(f"{wording.quoted(obj.uri)} has no current local copy and the mount is "
                                        "offline: the object store cannot be asked", bucket=obj.bucket, key=obj.key)
            if isinstance(verdict, Foreign):
                follower = ForeignDownload(obj, self.store, self.pages, self._meta, self.cfg.read_deadline,
                                           self.start_locked, self._followed, self._bad_data, self.prebaked)
                self._foreign[obj.version] = follower
                self._spawn(follower.follow)
                return follower
            assert isinstance(verdict, Fetch)
            try:
                if verdict.partial is not None:
                    return self._begin(obj, verdict.partial, verdict.lock_fd, background, keep=True)
                return await self.start_locked(obj, verdict.lock_fd, background)
            except BaseException:
                with trio.CancelScope(shield=True):  # cancelled too (a stop): the lock must not stay held
                    await run_else(self.store.partials.unlock, self.store.partials.drop_lock, obj, verdict.lock_fd,
                                   limiter=self._meta)
                raise

    async def _probe(self, obj: RemoteObject, probe: Callable[[], Verdict]) -> Verdict:
        """The store probe of an open, waiting at most --read-deadline: a store
        whose filesystem stopped answering holds the thread for good, and the
        reader (in a FUSE request no signal ends) would wait with it."""
        late = LateVerdict(self.store, obj)
        try:
            with trio.move_on_after(self.cfg.read_deadline):
                verdict = await run_sync(late.run, probe, limiter=self._meta, abandon_on_cancel=True)
                late.taken()
                return verdict
        finally:
            made = late.abandon()  # None once taken
            if made is not None:  # made as the open gave up, or was cancelled: release it off this thread
                start_soon(functools.partial(release, self.store, obj, made), released)
        raise _silent_store(self.cfg.read_deadline, obj)

    def _followed(self, follower: ForeignDownload) -> None:
        if self._foreign.get(follower.obj.version) is follower:
            del self._foreign[follower.obj.version]

    async def start_locked(self, obj: RemoteObject, lock: int, background: bool) -> Download:
        """Start (or resume) the download of `obj`, holding its store lock."""
        keep = await self.budget.reserve(obj, ahead=background) if self.budget is not None else True
        try:
            partial = await run_sync(open_partial_file, self.store, obj, self.cfg.block_size, limiter=self._meta)
            return self._begin(obj, partial, lock, background, keep)
        except BaseException:
            # No download holds the room (ENOSPC, shutdown): give it back, or
            # the budget shrinks for the rest of the run.
            if self.budget is not None and keep:
                self.budget.released(obj)
            raise

    def _begin(self, obj: RemoteObject, partial: Partial, lock: int, background: bool, keep: bool) -> Download:
        if self.closing:  # shutdown began while the store was being prepared (caller unlocks)
            partial.close()
            raise ShuttingDown(f"{wording.quoted(obj.uri)}: lazyfs is shutting down", bucket=obj.bucket, key=obj.key)
        dl = Download(obj, partial, self._limits, self.pages, background=background, keep=keep,
                      on_work=self.poke, on_closed=self.runner.discard_later, close_fd=self.close_fd,
                      wire=self._dispatcher.wire)
        dl.lock_fd = lock
        dl.wants_order = self.cfg.model_readahead and modelaware.is_safetensors(obj.key)
        self._downloads[obj.version] = dl
        if partial.done:
            log.info("%s: resuming download, %d of %d blocks already on disk", wording.quoted(obj.uri),
                     len(partial.done), dl.nblocks)
        self._spawn(self.runner.hash_along, dl)
        if obj.size == 0 or dl.all_done:
            dl.mark_all_done()
            self.runner.finish_once(dl)
        self.poke()
        return dl

    def _retired(self, dl: Download) -> None:
        if self._downloads.get(dl.obj.version) is dl:
            del self._downloads[dl.obj.version]
        if not dl.keep:  # never resumed, even complete: its record may be a second old, its readers still on it
            self.store.partials.condemn(dl.partial)


def _silent_store(seconds: float, obj: RemoteObject) -> StoreError:
    """What a question to the store that got no answer in time fails with (EIO)."""
    return StoreError(f"the store did not answer within {seconds:g} s about {wording.quoted(obj.key)} "
                      "(is its filesystem answering?)")
