"""`lazyfs bake`: fetch every configured object into a folder, laid out exactly
as the mount shows it, for a production image.  Files already current are
skipped, so a second run downloads nothing; identity records (origin "bake":
never evicted) and the listing (for offline starts) are written too.  With
a lock (--lock, or --write-lock's, made first) it bakes exactly the locked
versions, as a pinned mount fetches them (pinned.py), and lists nothing.

Reuses the catalog, the download engine and the prefetcher; never imports
pyfuse3.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

import trio

from lazyfs import crt, interrupt, lockcmd, memlimit, prefetch, storesweep, wording
from lazyfs.catalog import Catalog
from lazyfs.config import BakeConfig, FetchConfig
from lazyfs.errors import Interrupted, StoreError
from lazyfs.fetch import Fetcher
from lazyfs.lockfile import Lock
from lazyfs.mounttab import MountError, find_mount
from lazyfs.namespace import RemoteObject
from lazyfs.pinned import Pinning
from lazyfs.remote import Remote
from lazyfs.store import LocalCopy, Store

log = logging.getLogger(__name__)


@dataclass
class BakeResult:
    files: int
    downloaded: int
    skipped: int  # already current
    linked: int  # made current from the same bytes the store holds under another path
    failed: list[tuple[str, str]]  # (uri, why)
    bytes_downloaded: int  # the sizes of the files downloaded and kept
    seconds: float
    # Everything the GETs brought, a failed file's discarded bytes too.
    bytes_fetched: int = 0
    moded: int = 0  # files found on disk given the mode this bake asks for
    unverified: int = 0  # of those downloaded, how many only their size could be checked for (the store's log says why)
    file_mode: int = 0o444  # that mode (--store-mode's read bits, --file-mode's execute bits)


class BakedModes:
    """Gives each copy a bake finds on disk (already current, or linked from
    identical bytes) the mode a download of this bake would have: the bake's
    flags describe the result, so a second bake with `--file-mode 0555` makes
    the files executable, and one without it makes them data again."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.mode = store.permissions.file | store.permissions.executable
        self.changed = 0
        self._lock = threading.Lock()  # give() runs in worker threads

    def give(self, copy: LocalCopy) -> None:
        """Blocking.  A copy outside the store (a layer not ours) is left."""
        if copy.layer is not self.store.root or stat.S_IMODE(os.fstat(copy.fd).st_mode) == self.mode:
            return
        try:
            os.fchmod(copy.fd, self.mode)
        except OSError as e:
            raise StoreError(f"the copy already in the store cannot be given mode {self.mode:04o} "
                             f"({e.strerror}): bake as its owner") from None
        with self._lock:
            self.changed += 1


@dataclass
class Baking:
    """The bake under way, for what an interrupted one says it did not do."""

    warmer: prefetch.Prefetcher | None = None

    def unfinished(self, target: object) -> str:
        if self.warmer is None:
            return "it stopped before any download; run it again"
        p = self.warmer.progress
        return (f"{p.done_files} of {wording.count(p.files, 'file')} are in {target}; run it again to fetch the "
                "rest (downloads it stopped resume where they were)")


def run(cfg: BakeConfig, out: TextIO = sys.stdout) -> int:
    entry = find_mount(cfg.target)
    if entry is not None and entry.fstype.startswith("fuse"):
        raise MountError(f"{cfg.target} is a mount ({entry.fstype}): bake into a plain folder "
                         "(unmount it first, or choose another --to)")
    store = Store.open(str(cfg.target), mode=cfg.store_mode, create=True, file_mode=cfg.file_mode, follow=True)
    baking, making = Baking(), lockcmd.Making()
    try:
        remote = Remote(cfg.remote)
        result, lock = interrupt.run(_bake, cfg, store, remote, out, baking, making)
    except Interrupted as e:
        e.unfinished = baking.unfinished(cfg.target)
        raise
    finally:
        store.close()
    for uri, why in result.failed:
        print(failed_line(uri, why), file=out)
    print(summary(result, cfg.target, lock), file=out, flush=True)
    if cfg.write_lock is not None and lock is not None:
        if result.failed:
            print(f"lazyfs bake: no lock written to {cfg.write_lock}: not every file is in", file=out, flush=True)
        else:
            lockcmd.write(lock, cfg.write_lock, out)
            print(lockcmd.summary(lock, cfg.write_lock, making), file=out, flush=True)
    return 0 if not result.failed else 1


def summary(result: BakeResult, target: object, lock: Lock | None) -> str:
    """The last line: what was downloaded, linked from identical bytes already
    in the store (a new version folder sharing files with the old), already
    current, failed."""
    linked = f"{result.linked} linked from identical copies, " if result.linked else ""
    moded = f" ({result.moded} given mode {result.file_mode:04o})" if result.moded else ""
    # After a failure, what the downloads cost in all (a failed file's bytes are thrown away).
    fetched = f"; {result.bytes_fetched / 2**20:.1f} MiB fetched in all" if result.failed else ""
    # Their content checked against nothing (SSE-KMS, no checksum, part sizes the store cannot say): said, not failed.
    unverified = f"; {result.unverified} unverified: size checked, not content" if result.unverified else ""
    return (f"lazyfs bake: {wording.count(result.files, 'file')}: {result.downloaded} downloaded "
            f"({result.bytes_downloaded / 2**20:.1f} MiB{fetched}{unverified}), {linked}{result.skipped} already "
            f"current{moded}, "
            f"{len(result.failed)} failed, in {result.seconds:.1f} s -> {target}"
            + (f" (lock {lock.short_digest})" if lock is not None else ""))


def failed_line(uri: str, why: str) -> str:
    """The line saying a file could not be baked: one line, its name quoted
    as log lines quote it, whatever the key or the cause's text holds."""
    shown = wording.quoted(uri)  # once: the cause's own text names the file too
    return f"lazyfs bake: failed: {shown}: {wording.one_line(wording.cause(why, shown))}"


async def _bake(cfg: BakeConfig, store: Store, remote: Remote, out: TextIO, baking: Baking,
                making: lockcmd.Making) -> tuple[BakeResult, Lock | None]:
    """Bake what the listing shows, or exactly a lock's versions (--lock; with
    --write-lock, a lock made here first, what its summary says gathered in `making`)."""
    lock, fetch = cfg.lock, _within_memory(cfg)
    if lock is None and cfg.write_lock is not None:
        lock = await lockcmd.make_lock(remote, cfg.sources, cfg.configs, making)
    if lock is not None:
        pin = Pinning(lock, remote)
        objects = pin.objects()
        fetcher = Fetcher(pin.store, store, fetch, origin="bake",
                          fetch_range=pin.transfer(remote, fetch, cfg.memory_limit), pinned=True,
                          stall_s=cfg.remote.read_timeout)
    else:
        catalog = Catalog(remote, cfg.sources, store)
        await catalog.refresh()  # a failure here is a runtime error (exit 1)
        objects = list(catalog.tree.files())
        fetcher = Fetcher(remote, store, fetch, origin="bake",
                          fetch_range=crt.transfer_for(remote, fetch, cfg.memory_limit),
                          stall_s=cfg.remote.read_timeout)
    return await _fetch_all(fetcher, objects, out, baking), lock


def _within_memory(cfg: BakeConfig) -> FetchConfig:
    """The downloads' settings with as many parallel GETs as --memory-limit
    allows (memlimit.parallel_gets, as a mount's); its CRT buffers are sized
    from it where the client is built (crt.transfer_for)."""
    conns = memlimit.parallel_gets(cfg.memory_limit, cfg.fetch.max_connections)
    if conns == cfg.fetch.max_connections:
        return cfg.fetch
    log.info("--memory-limit %d MiB allows %d parallel GETs", cfg.memory_limit >> 20, conns)
    return dataclasses.replace(cfg.fetch, max_connections=conns)


async def _fetch_all(fetcher: Fetcher, objects: list[RemoteObject], out: TextIO, baking: Baking) -> BakeResult:
    listed = {obj.version for obj in objects}  # what the bake's listing (or lock) makes current
    fetcher.hooks.is_current = lambda obj: obj.version in listed
    await storesweep.sweep(fetcher.store, objects, fetcher.runner.bulk)
    modes = BakedModes(fetcher.store)
    warmer = baking.warmer = prefetch.Prefetcher(fetcher, concurrent_files=max(8, fetcher.cfg.max_connections),
                                                 must_keep=True, on_local=modes.give)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        nursery.start_soon(_report, warmer, fetcher, out)
        # Stopped by a signal: the downloads record what they have on disk
        # (their resume records) before they are cancelled.
        with interrupt.on_stop(fetcher.close):
            progress = await warmer.run(objects)
        nursery.cancel_scope.cancel()
    return BakeResult(files=len(objects), downloaded=progress.done_files - progress.local_files,
                      skipped=progress.local_files - progress.linked_files, linked=progress.linked_files,
                      failed=progress.failed,
                      bytes_downloaded=progress.done_bytes - progress.local_bytes, unverified=progress.unverified_files,
                      bytes_fetched=fetcher.bytes_from_s3, seconds=time.monotonic() - started,
                      moded=modes.changed, file_mode=modes.mode)


async def _report(warmer: prefetch.Prefetcher, fetcher: Fetcher, out: TextIO) -> None:
    """A progress bar with bytes, rate and ETA on a terminal; a plain line
    every few seconds otherwise (build logs, CI)."""
    await trio.sleep(0)  # let the prefetcher set its totals
    p = warmer.progress
    if out.isatty():
        from tqdm import tqdm

        with tqdm(total=p.bytes, unit="B", unit_scale=True, unit_divisor=1024, file=out,
                  desc="baking", dynamic_ncols=True) as bar:
            shown = 0
            while True:
                now = _bytes_done(warmer, fetcher)
                bar.update(now - shown)
                shown = now
                bar.set_postfix_str(f"{p.done_files}/{wording.count(p.files, 'file')}")
                await trio.sleep(0.2)
    started = time.monotonic()
    while True:
        await trio.sleep(5)
        done = _bytes_done(warmer, fetcher)
        secs = time.monotonic() - started
        rate = done / secs if secs else 0.0
        eta = (p.bytes - done) / rate if rate else float("inf")
        print(f"lazyfs bake: {p.done_files}/{wording.count(p.files, 'file')}, "
              f"{done / 2**20:.0f}/{p.bytes / 2**20:.0f} MiB, {rate / 1e6:.0f} MB/s, ETA {eta:.0f} s",
              file=out, flush=True)


def _bytes_done(warmer: prefetch.Prefetcher, fetcher: Fetcher) -> int:
    """Bytes of finished files plus bytes on disk of the downloads running."""
    return warmer.progress.done_bytes + sum(dl.fetched_bytes for dl in fetcher.downloads())
