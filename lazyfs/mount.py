"""The mount's lifecycle, as a sequence of short named steps:

  1. check the mountpoint (clean up a stale mount a crashed lazyfs left),
  2. open the store by descriptor *before* mounting over it,
  3. probe every source once, so a wrong bucket or credentials fail at start,
  4. mount, then serve in one trio nursery: FUSE main loop, download engine,
     listings, and a signal task,
  5. on SIGTERM/SIGINT or an external unmount: stop downloads (recording what
     is on disk for a resume), end the main loop, unmount, exit 0; when the
     kernel connection is aborted (`umount --force`), the requests in flight
     are abandoned first: no answer could reach anyone (connwatch.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import gc
import logging
import math
import resource
import signal
from contextlib import AsyncExitStack
from typing import AsyncIterator

import pyfuse3
import trio

from lazyfs import checkpoint, connwatch, crt, exhausted, interrupt, memlimit, prefetch, storemodes, storesweep, wording
from lazyfs.budget import Budget
from lazyfs.catalog import Catalog
from lazyfs.config import MountConfig, Source
from lazyfs.drift import DriftWatch
from lazyfs.errors import RemoteError, RemoteFailing, StoreError
from lazyfs.fdneeds import fit_descriptors
from lazyfs.fetch import Fetcher
from lazyfs.filemap import PageBudget
from lazyfs.filemodes import FileModes
from lazyfs.fuse_ops import Operations
from lazyfs.handles import Handles
from lazyfs.kernelcache import KernelCache
from lazyfs.laststop import LastStop
from lazyfs.layer import Layer
from lazyfs.metrics import MountView
from lazyfs.mounttab import MountError, check_mountpoint, set_background, set_read_ahead
from lazyfs.namespace import Diff, RemoteObject
from lazyfs.objectstore import ObjectStore
from lazyfs.offlinestart import offline_start, start_failure, starts_offline
from lazyfs.pinned import Pinning
from lazyfs.quiet import Quiet
from lazyfs.recheck import Rechecks
from lazyfs.refresher import Refresher
from lazyfs.remote import Remote
from lazyfs.startup import FirstListing
from lazyfs.store import Store
from lazyfs.storespace import StoreSpace
from lazyfs.supervise import failed, forever, once

log = logging.getLogger(__name__)

# Handlers awaiting a download each hold a pyfuse3 worker task; this many
# readers can wait at once before the kernel's queue backs up.
MAX_FUSE_TASKS = 512
# After SIGTERM, requests still in flight get this long to finish.
SHUTDOWN_GRACE_S = 5.0
# Read requests the kernel may keep in flight to the daemon (readahead of
# several files at once); pyfuse3 serves up to MAX_FUSE_TASKS concurrently.
BACKGROUND_REQUESTS = 64
# The first listing of a folder bigger than the start-up page waits until
# readers' requests have left the network quiet this long (quiet.py): an open
# right after the mount goes first.
FIRST_LISTING_QUIET_S = 0.1
# The ready line waits at most this long for the first listing (see _announce).
READY_WAIT_S = 0.5


def open_store(cfg: MountConfig) -> Store:
    try:
        if cfg.store is None:
            # The mountpoint's own directory, held open so it stays reachable once the mount covers it.
            root = Layer.open(str(cfg.mountpoint), True, "store")
        else:
            root = Layer.open(str(cfg.store), True, "store", create_mode=storemodes.new_store(cfg.store_mode).folder)
        return Store.open(root.path, [str(p) for p in cfg.prebaked], root_fd=root.fd, mode=cfg.store_mode,
                          file_mode=cfg.file_mode)
    except OSError as e:
        raise StoreError(f"cannot use store {cfg.store_path}: {exhausted.strerror(e)}", e.errno or errno.EIO) from None


def mount_options(cfg: MountConfig) -> set[str]:
    opts = {"fsname=lazyfs", "subtype=lazyfs", "ro", "default_permissions"}
    if cfg.allow_other:
        opts.add("allow_other")
    return opts


# mallopt(3)'s parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above a FUSE reply (1 MiB at most), so those keep coming from the heap.
_MMAP_FROM = 4 << 20
# Free memory an arena keeps atop its heap: above a reply, so that freeing
# one does not hand its pages back only for the next to fault them in again.
_KEEP_ATOP = 2 << 20


def return_freed_buffers() -> None:
    """Serve buffers of 4 MiB and up (a part the CRT hands over) from mmap,
    so freeing one gives its pages back to the kernel.  glibc otherwise
    raises its mmap and trim thresholds after the first large free and keeps
    later buffers, and the free memory atop its per-thread arenas: 15-60 MiB
    of resident memory that --memory-limit does not count, different in
    every run (measured with either transfer client).  Smaller buffers (FUSE
    replies, GET pieces) stay on the heap: an mmap each would cost a page
    fault per 4 KiB.  Setting the mmap threshold also fixes glibc's trim
    threshold at 128 KiB, so each reply freed atop the heap was given back
    and the next faulted in anew (about 230,000 page faults per GiB served):
    up to 2 MiB stays.  A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM)
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_ATOP)
    except (OSError, AttributeError):
        log.debug("no mallopt: freed buffers stay with the allocator")


def raise_fd_limit() -> None:
    """Each open file and each download holds a descriptor; the default soft
    limit (1024) is too low for many concurrent readers and downloads."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.debug("could not raise the descriptor limit: %s", e)


def apply_memory_limit(cfg: MountConfig) -> MountConfig:
    """Split --memory-limit: a quarter for mapped pages of files being read,
    half for ranged GETs in flight (memlimit.parallel_gets); fewer
    connections if it must.  The page share is applied by `page_budget`."""
    conns = memlimit.parallel_gets(cfg.memory_limit, cfg.fetch.max_connections)
    if conns < cfg.fetch.max_connections:
        log.info("--memory-limit %d MiB allows %d parallel GETs", cfg.memory_limit >> 20, conns)
        cfg = dataclasses.replace(cfg, fetch=dataclasses.replace(cfg.fetch, max_connections=conns))
    return cfg


def _bad_bytes(handles: Handles, kernel: KernelCache, obj: RemoteObject) -> None:
    """Bytes of `obj` failed verification: the pages the kernel cached of them go, now and at the next opens."""
    handles.bytes_were_bad(obj)
    kernel.drop_pages(obj)


def page_budget(cfg: MountConfig) -> PageBudget:
    """A quarter of --memory-limit for mapped pages of files being read."""
    return PageBudget(total=cfg.memory_limit // 4)


def run(cfg: MountConfig, first: FirstListing | None = None) -> int:
    """Mount and serve until stopped.  Returns the exit code.  `first`: the
    client and first listing `cli` began before importing this module (one
    is begun here if not)."""
    raise_fd_limit()
    return_freed_buffers()
    cfg = apply_memory_limit(cfg)
    first = first or FirstListing(cfg)
    check_mountpoint(cfg.mountpoint)
    store = open_store(cfg)
    try:
        offline: tuple[list[RemoteObject], str] | None = None  # what an offline start serves, and why
        listed: dict[Source, list[RemoteObject]] = {}
        failing: RemoteFailing | None = None
        try:
            # Proves each folder can be listed (a wrong bucket or credentials
            # fail here, exit 1); a folder that fits in its first page is
            # listed already, and the first listing does not ask again.
            listed = first.result()
        except RemoteFailing as e:  # answered (5xx, SlowDown): reachable, the listing is retried
            failing = e
        except RemoteError as e:  # not asked (unreachable, no credentials for now): offline; refused: exit 1
            if not starts_offline(e):
                raise start_failure(e) from None
            offline = offline_start(store, cfg, e), str(e)
        return trio.run(_serve, cfg, store, first.remote, offline, listed, failing)
    finally:
        store.close()


async def _serve(cfg: MountConfig, store: Store, remote: Remote, offline: tuple[list[RemoteObject], str] | None,
                 listed: dict[Source, list[RemoteObject]], failing: RemoteFailing | None) -> int:
    cfg = fit_descriptors(cfg, crt.CRT_DESCRIPTORS if cfg.fetch.transfer_client == "crt" else 0)  # (trio's are open)
    pin = Pinning(cfg.lock, remote) if cfg.lock is not None else None
    source: ObjectStore = pin.store if pin is not None else remote
    quiet = Quiet(FIRST_LISTING_QUIET_S)
    catalog = Catalog(source, cfg.sources, store, quiet=quiet)
    catalog.listed_at_start(listed, failing)
    fetcher = Fetcher(source, store, cfg.fetch, page_budget(cfg),
                      fetch_range=pin.transfer(remote, cfg.fetch, cfg.memory_limit) if pin is not None
                      else crt.transfer_for(remote, cfg.fetch, cfg.memory_limit), pinned=pin is not None,
                      stall_s=cfg.remote.read_timeout)
    fetcher.offline = lambda: catalog.offline
    if fetcher.prebaked is not None:  # a copy judged offline is judged again once a listing succeeds
        fetcher.prebaked.listings = lambda: catalog.listings_ok
        fetcher.prebaked.offline = lambda: catalog.offline
    if offline is not None:
        catalog.start_offline(*offline)
    if pin is not None:
        catalog.start_pinned(pin.objects())
        fetcher.hooks.refuse = pin.refuse
    handles = Handles(fetcher)
    handles.next_shard = lambda obj: checkpoint.next_shard(catalog, obj)
    handles.companions = lambda obj: checkpoint.companions(catalog, obj)
    handles.index_shards = lambda obj: checkpoint.index_shards(catalog, obj)
    fetcher.hooks.is_current = lambda obj: is_current(catalog, obj)
    fetcher.hooks.quiet = quiet
    if cfg.cache_max_size is not None:
        fetcher.hooks.budget = Budget(store, cfg.cache_max_size)
    drift = DriftWatch(pin, catalog.lister, cfg.sources, cfg.refresh) if pin is not None else None
    space = StoreSpace(store.fsinfo)
    view = MountView(catalog, fetcher, handles, store, space, str(cfg.mountpoint), drift)
    ops = Operations(catalog, handles, space, view.snapshot_bytes, cfg.xattrs, cfg.passthrough, cfg.direct_io,
                     FileModes(cfg.file_mode, store.layers))
    fetcher.hooks.on_bad_data = functools.partial(_bad_bytes, handles, ops.kernel)
    if cfg.metrics_port is not None:
        from lazyfs.prometheus import serve_metrics  # only when asked: start-up time
        try:
            serve_metrics(view, cfg.metrics_addr, cfg.metrics_port)
        except OSError as e:
            raise MountError(f"cannot serve metrics on {cfg.metrics_addr}:{cfg.metrics_port}: {e.strerror}") from None
        log.info("metrics at http://%s:%d/metrics", cfg.metrics_addr, cfg.metrics_port)
    stopping = trio.Event()
    last_stop = LastStop(cfg.mountpoint, after=3 * SHUTDOWN_GRACE_S)
    warmer = Warmer(catalog, cfg, fetcher)
    refresher = drift or Refresher(catalog, cfg.refresh, [ops.kernel.forget_names, warmer.on_change])
    # An object replaced or deleted in S3 during its download: its HEAD, and a name a 404 took asked about again.
    rechecks = Rechecks(catalog, cfg.refresh, [ops.kernel.forget_names, warmer.on_change], refresher.request)
    fetcher.hooks.on_changed = rechecks.object_changed
    async with AsyncExitStack() as stack:
        signals = stack.enter_context(interrupt.mount_signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        try:
            pyfuse3.init(ops, str(cfg.mountpoint), mount_options(cfg))
        except RuntimeError as e:
            if lack := exhausted.short_of_descriptors():  # (libfuse says no more than "fuse_session_mount failed")
                raise MountError(f"cannot mount at {cfg.mountpoint}: {exhausted.descriptors(lack)}", lack) from None
            raise MountError(f"cannot mount at {cfg.mountpoint}: {e} (is /dev/fuse available, and "
                             "are you root or is fusermount3 installed?)") from None
        stack.callback(pyfuse3.close, unmount=True)  # once per process: pyfuse3.init() opened its one session
        last_stop.mounted()
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            # Every background task is supervised: it may fail, the mount goes on.
            nursery.start_soon(forever, "refresher", refresher.run)
            nursery.start_soon(forever, "rechecks", rechecks.run)
            nursery.start_soon(forever, "prefetch", warmer.run)
            nursery.start_soon(forever, "killed readers", ops.kills.run)
            nursery.start_soon(forever, "signals", functools.partial(
                _watch_signals, signals, refresher, fetcher, ops.kernel, stopping, last_stop, nursery.cancel_scope))
            nursery.start_soon(once, "readahead", _tune_after_init, ops, cfg, quiet)
            if fetcher.budget is not None:
                # Its scan first: until that succeeds, earlier runs' files neither
                # count nor go; one that failed (an EIO walking the store) runs again.
                nursery.start_soon(forever, "cache budget", fetcher.budget.run)
            nursery.start_soon(once, "ready line", _announce, cfg, catalog)
            nursery.start_soon(once, "store sweep", storesweep.after_first_listing, catalog, store, fetcher.runner.bulk,
                               fetcher.budget.fits if fetcher.budget is not None else None)
            with trio.CancelScope() as serving:  # cancelled once the kernel connection is gone (connwatch.py)
                nursery.start_soon(once, "connection watch", connwatch.abandon_when_gone, serving,
                                   lambda: ops.in_flight)
                await pyfuse3.main(min_tasks=1, max_tasks=MAX_FUSE_TASKS)
            # The main loop ended: SIGTERM/SIGINT, or someone unmounted us (or aborted our connection).
            last_stop.arm()
            if not stopping.is_set():
                log.info("%s was unmounted; exiting", cfg.mountpoint)
                await fetcher.close()
            with trio.move_on_after(SHUTDOWN_GRACE_S):
                await ops.kernel.settle()  # none may be inside pyfuse3 when its session goes
            handles.close_all()
            nursery.cancel_scope.cancel()
    log.info("lazyfs stopped")
    return 0


def is_current(catalog: Catalog, obj: RemoteObject) -> bool:
    found = catalog.tree.find(obj.key) if catalog.listed.is_set() else None
    return isinstance(found, RemoteObject) and found.same_bytes(obj)


async def _announce(cfg: MountConfig, catalog: Catalog) -> None:
    """The ready line, once the first listing is in (or has failed) or
    READY_WAIT_S has passed: a model folder lists in one round trip, and then
    an `ls` or an open right after "ready" waits for none; a huge prefix goes
    on listing in the background (lookups meanwhile list just their own
    names).  The mount already serves requests while this waits.  The line
    says what the mount serves when that is not a live listing."""
    with trio.move_on_after(READY_WAIT_S):
        await catalog.settled.wait()
    try:
        print(ready_line(cfg, catalog), flush=True)
    except (OSError, ValueError) as e:  # stdout closed: the mount serves all the same
        log.warning("cannot print the ready line: %s", e)
    finally:
        # The cyclic collector was off for the start-up (cli.main).  What
        # start-up made stays for the mount's life: frozen, it is never walked
        # again (its few cycles of garbage stay too: a collection now would
        # hold the loop ~30 ms just as the first requests come).
        gc.freeze()
        gc.enable()


def ready_line(cfg: MountConfig, catalog: Catalog) -> str:
    where = f"{', '.join(s.uri for s in cfg.sources)} mounted at {cfg.mountpoint} (store {cfg.store_path})"
    if cfg.lock is not None:
        by = "each by its version id" if cfg.lock.versioned else "by version id or ETag"
        return (f"lazyfs: ready PINNED: {where}; serving lock {cfg.lock.path} ({cfg.lock.short_digest}, "
                f"{wording.count(cfg.lock.files, 'file')}, {by})")
    state, error = catalog.state, catalog.last.error
    if state == "offline":
        return f"lazyfs: ready OFFLINE: {where}"
    if state == "saved":
        return (f"lazyfs: ready SAVED LISTING: {where}; serving the store's saved listing "
                f"({wording.count(catalog.tree.objects, 'file')}) while the listing is retried ({error})")
    if state == "failing":
        return (f"lazyfs: ready LISTING FAILED: {where}; the listing is being retried ({error}); "
                "meanwhile each lookup lists its own name")
    if state == "listing":
        return f"lazyfs: ready: {where}; still listing (meanwhile each lookup lists its own name)"
    return f"lazyfs: ready: {where}"


async def _tune_after_init(ops: Operations, cfg: MountConfig, quiet: Quiet) -> None:
    # The kernel resets the readahead on the INIT reply: only a setting made after it sticks.
    await ops.initialized.wait()
    quiet.restart()  # readers can come now: background listings leave them the quiet period from here
    await trio.sleep(0)
    set_read_ahead(cfg.mountpoint, cfg.read_ahead)
    set_background(cfg.mountpoint, BACKGROUND_REQUESTS)


class Warmer:
    """--prefetch: everything matching after the first listing, then what a
    refresh adds or changes."""

    def __init__(self, catalog: Catalog, cfg: MountConfig, fetcher: Fetcher) -> None:
        self.catalog = catalog
        self.enabled = cfg.prefetch is not None
        self.match = prefetch.matcher(cfg.prefetch or (), cfg.sources)
        self.prefetcher = prefetch.Prefetcher(fetcher)
        self._send, self._receive = trio.open_memory_channel[list[RemoteObject]](math.inf)

    def on_change(self, diff: Diff) -> None:
        if self.enabled:
            self._send.send_nowait([o for o in diff.added + tuple(new for _, new in diff.changed)
                                    if self.match(o)])

    async def run(self) -> None:
        if not self.enabled:
            return
        tree = await self.catalog.current()
        while self.catalog.offline and not self.catalog.last.ok:
            await trio.sleep(1)  # nothing can be fetched yet
            tree = self.catalog.tree
        await self._warm([o for o in tree.files() if self.match(o)])
        async for objects in self._receive:
            await self._warm(objects)

    async def _warm(self, objects: list[RemoteObject]) -> None:
        if not objects:
            return
        log.info("prefetch: %s, %.2f GiB", wording.count(len(objects), "file"), sum(o.size for o in objects) / 2**30)
        result = await self.prefetcher.run(objects)
        log.info("prefetch done: %s", prefetch.summary(result))


async def _watch_signals(signals: AsyncIterator[int], refresher: Refresher | DriftWatch, fetcher: Fetcher,
                         kernel: KernelCache, stopping: trio.Event, last_stop: LastStop,
                         everything: trio.CancelScope) -> None:
    async for sig in signals:
        if sig == signal.SIGHUP:
            log.info("SIGHUP: refreshing the listing")
            refresher.request()
            continue
        log.info("%s: unmounting", signal.Signals(sig).name)
        stopping.set()
        last_stop.arm()
        with trio.move_on_after(SHUTDOWN_GRACE_S):
            try:
                await fetcher.close()
                # Reads answered (failed, at worst), the page drops they held
                # up end; one left behind would keep the mount alive forever.
                await kernel.settle()
            except Exception as e:
                # Unmount all the same: the supervisor's "go on" would mean
                # ignoring SIGTERM until a SIGKILL leaves a dead mount behind.
                failed("signals", e)
        pyfuse3.terminate()
        # Requests still in flight end the main loop when they finish; one that
        # cannot (waiting on a listing that will not come) must not keep a
        # stopping container alive: after the grace period everything is
        # cancelled and the unmount aborts what is left.
        await trio.sleep(SHUTDOWN_GRACE_S)
        log.warning("requests still in flight after %g s; stopping anyway", SHUTDOWN_GRACE_S)
        everything.cancel()
        return
