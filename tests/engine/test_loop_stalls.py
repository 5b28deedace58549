"""What a 100 GiB file costs the trio thread (issue 11 #13): resuming a
download of scattered blocks, and its progress (`Download.fetched_bytes`,
read by every xattr, stats read and progress line), cost no loop over its
blocks; every close of a descriptor of an unlinked file (which may free its
blocks: the reader's, and the page cache read-ahead's own) runs in a worker
thread; and the pages of a cold cached file are read into the page cache by
worker threads (pagecache.Prefaulter) before a reply copies them, and ahead
of the reader.  The refresh's share is test_refresh_stall.py.

Costs are measured on the trio thread's own CPU clock (support/loopwatch),
which a loaded machine does not stretch; faults with the thread's own
resource usage (RUSAGE_THREAD); which thread does what by recording the
thread that makes the system call."""

from __future__ import annotations

import json
import mmap
import os
import random
import resource
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from lazyfs import storeroom
from lazyfs.catalog import Catalog
from lazyfs.download import DONE, Download
from lazyfs.fetch import Fetcher
from lazyfs.filemap import CHUNK
from lazyfs.fuse_ops import Operations
from lazyfs.handles import Handles
from lazyfs.inodes import ROOT_INODE
from lazyfs.metrics import MountView
from lazyfs.modeljson import Source
from lazyfs.namespace import RemoteObject
from lazyfs.pagecache import READ_AHEAD_CHUNKS
from lazyfs.ranged_get import RangeJob, Stopped
from lazyfs.storespace import StoreSpace
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote
from support.loopwatch import Lateness, StepTimer, watched
from support.pagecache import drop_from_page_cache

MiB = 1 << 20
GiB = 1 << 30
CTX: Any = None  # the handlers never look at the request context


class Hollow:
    """The body of an object too large to hold: only its length is real (its
    bytes are never fetched: the test's `fetch_range` writes nothing)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, s: slice) -> bytes:
        return bytes(len(range(*s.indices(self.size))))


class RecordingOs:
    """Stands for the `os` module of one lazyfs module: records the thread of
    each `close` (with the inode and links left of the file it closes) and of
    each `sendfile` (with its range); everything else is the real `os`."""

    def __init__(self) -> None:
        self.closes: list[tuple[int, int, int]] = []  # (inode, links, thread)
        self.sendfiles: list[tuple[int, int, int]] = []  # (offset, bytes read, thread)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def close(self, fd: int) -> None:
        try:
            st = os.fstat(fd)
            self.closes.append((st.st_ino, st.st_nlink, threading.get_ident()))
        except OSError:
            pass
        os.close(fd)

    def sendfile(self, out_fd: int, in_fd: int, offset: int, count: int) -> int:
        sent = os.sendfile(out_fd, in_fd, offset, count)
        self.sendfiles.append((offset, sent, threading.get_ident()))
        return sent

    def closed(self, ino: int) -> list[tuple[int, int, int]]:
        return [c for c in self.closes if c[0] == ino]

    def covered(self, start: int, end: int) -> bool:
        """Did sendfile calls read every byte of [start, end)?"""
        pos = start
        for off, count, _ in sorted(self.sendfiles):
            if off <= pos < off + count:
                pos = off + count
        return pos >= end


async def downloaded(fetcher: Fetcher, obj: RemoteObject) -> None:
    """Download `obj` whole and wait until it is published."""
    got = await fetcher.acquire(obj)
    assert isinstance(got, Download)
    await got.finished.wait()
    await wait_for(lambda: fetcher.active(obj) is None, "publication")


def said(steps: StepTimer, late: Lateness) -> str:
    return f"{steps}; a 1 ms timer fired up to {late.worst * 1000:.0f} ms late"


async def ops_for(remote: FakeRemote, fetcher: Fetcher) -> tuple[Operations, Catalog]:
    catalog = Catalog(remote, [Source(BUCKET, "m/")])
    await catalog.refresh()
    handles = Handles(fetcher)
    space = StoreSpace(fetcher.store.fsinfo)
    view = MountView(catalog, fetcher, handles, fetcher.store, space, "/mnt")
    return Operations(catalog, handles, space, stats_file=view.snapshot_bytes), catalog


async def inode_of(ops: Operations, *names: str) -> int:
    ino = ROOT_INODE
    for name in names:
        ino = (await ops.lookup(ino, name.encode(), CTX)).st_ino
    return ino


def listed(catalog: Catalog, key: str) -> RemoteObject:
    obj = catalog.tree.find(key)
    assert isinstance(obj, RemoteObject)
    return obj


# -- 1. a download's progress -------------------------------------------------------------


@pytest.mark.slow
@trio_test
async def test_a_resumed_100_gib_download_and_its_progress_cost_no_scan_over_its_blocks(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """100 GiB in 256 KiB blocks (the engine tier's --part-size): 409,600
    blocks, half of them on disk from an earlier run, scattered, and 16
    requests in flight, each part-way through its first block.  Resuming it
    (the open that finds the record, the first saves of the record) and
    reading its progress (the xattr, the stats file: `fetched_bytes`) hold
    the trio thread a few ms at most.  Before: a loop over the done blocks in
    the open (about 55 ms of CPU here) and a scan over the blocks per
    progress read (about 60 ms per call here, 24 ms at 1 MiB blocks); now
    the block map comes from the store thread that opened the file
    (Partial.done_map), and the progress is a counter plus the requests in
    flight."""
    # The sparse file never holds a byte: the disk need not have 100 GiB free.
    monkeypatch.setattr(storeroom, "check", lambda tmp_fd, obj, store_path, need=None: None)
    remote.put(BUCKET, "m/huge.bin", b"")
    remote.objects[(BUCKET, "m/huge.bin")].data = Hollow(100 * GiB)  # type: ignore[assignment]
    release = threading.Event()
    first = threading.Lock()
    landed: list[int] = []

    def in_flight(job: RangeJob) -> None:
        """The first GET lands whole (the slow start ends with it); every
        later one gets half a block and then waits (until the close)."""
        if first.acquire(blocking=False):
            job.posted(job.end - job.start)
            landed.append(job.end - job.start)
            return
        job.posted(job.block_size // 2)
        while not (release.is_set() or job.cancelled()):
            release.wait(0.05)
        raise Stopped()

    cfg = fetch_config()
    store = stores()
    fetcher = Fetcher(remote, store, cfg, fetch_range=in_flight)
    try:
        async with running(fetcher):
            ops, catalog = await ops_for(remote, fetcher)
            obj = listed(catalog, "m/huge.bin")
            nblocks = obj.size // cfg.block_size
            rng = random.Random(13)
            done = {i for i in range(nblocks) if rng.random() < 0.5}

            def earlier_run() -> None:  # its resume record: the scattered blocks on disk
                partial = store.partials.open(obj, cfg.block_size)
                partial.save_state(done)
                partial.close()

            await trio.to_thread.run_sync(earlier_run)
            ino = await inode_of(ops, "m", "huge.bin")
            async with watched() as (resume, resume_late):
                fh = (await ops.open(ino, os.O_RDONLY, CTX)).fh
                dl = fetcher.active(obj)
                assert isinstance(dl, Download) and dl.nblocks == nblocks == 409_600
                assert dl.ndone == len(done) and dl.state.count(DONE) == len(done)
                # (the last free connection is kept for a reader's bytes: dispatch.Dispatcher)
                await wait_for(lambda: len(dl.requests) == cfg.max_connections - 1
                               and all(r.filled for r in dl.requests), "every request in flight")
                await wait_for(lambda: dl.state_saved_at and not dl.saving, "a save of the resume record")
            expected = (len(done) * cfg.block_size + sum(landed)
                        + (cfg.max_connections - 1) * (cfg.block_size // 2))
            assert dl.fetched_bytes == expected

            calls = 100
            async with watched() as (reads, reads_late):
                for _ in range(calls):
                    got = await ops.getxattr(ino, b"user.lazyfs.fetched_bytes", CTX)
                    assert got == str(expected).encode()
                    await trio.sleep(0)
                    await inode_of(ops, ".lazyfs", "stats.json")  # a lookup builds the stats snapshot
                    await trio.sleep(0)
            [shown] = json.loads(ops.stats_file())["downloads"]["in_flight"]
            assert shown["fetched_bytes"] == expected
            started = time.thread_time()
            for _ in range(100):
                assert dl.fetched_bytes == expected
            per_call = (time.thread_time() - started) / 100
            print(f"\na 100 GiB download, {nblocks} blocks, {len(done)} on disk (scattered), "
                  f"{len(dl.requests)} requests in flight:\n  resumed: {said(resume, resume_late)}\n"
                  f"  fetched_bytes: {per_call * 1e6:.1f} us of CPU per call; "
                  f"{calls} xattr reads and stats snapshots: {said(reads, reads_late)}")
            assert resume.worst_cpu < 0.02, str(resume)
            assert per_call < 0.0005, f"{per_call * 1000:.2f} ms per call"
            assert reads.worst_cpu < 0.005, str(reads)
            await ops.release(fh)
    finally:
        release.set()


# -- 2. the close of an unlinked file's last descriptor -----------------------------------------


def unlinked_closes(recorder: RecordingOs, ino: int) -> int:
    return sum(1 for _, links, _ in recorder.closed(ino) if links == 0)


class HeldReadAhead(RecordingOs):
    """Also holds every sendfile past the first chunk (the read-ahead) until `go`."""

    def __init__(self) -> None:
        super().__init__()
        self.held = threading.Event()
        self.go = threading.Event()

    def sendfile(self, out_fd: int, in_fd: int, offset: int, count: int) -> int:
        if offset >= CHUNK:
            self.held.set()
            self.go.wait(10)
        return super().sendfile(out_fd, in_fd, offset, count)


@trio_test
async def test_the_last_close_of_an_evicted_cached_file_is_not_on_the_trio_thread(
        remote: FakeRemote, stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached file evicted (or replaced) while a reader has it open and the
    page cache's read-ahead is reading it: the reader's release, then the
    read-ahead's end, close its last descriptors, and the last one frees the
    file's blocks (seconds for 100 GiB on some filesystems).  Every close of
    a descriptor of the unlinked file runs in a worker."""
    data = os.urandom(4 * MiB)
    remote.put(BUCKET, "m/w.bin", data)
    store = stores()
    fetcher = Fetcher(remote, store, fetch_config(part_size=4 * MiB))
    recorder = HeldReadAhead()
    try:
        async with running(fetcher):
            ops, catalog = await ops_for(remote, fetcher)
            obj = listed(catalog, "m/w.bin")
            ino = await inode_of(ops, "m", "w.bin")
            fh = (await ops.open(ino, os.O_RDONLY, CTX)).fh
            dl = fetcher.active(obj)
            assert isinstance(dl, Download)
            await ops.release(fh)
            await wait_for(lambda: dl.complete and dl.pins == 0, "publication, and the download's descriptor closed")
            drop_from_page_cache(tmp_path / "store" / "m" / "w.bin")  # as after a restart: read in again
            monkeypatch.setattr("lazyfs.fetch.os", recorder)
            monkeypatch.setattr("lazyfs.pagecache.os", recorder)
            fh = (await ops.open(ino, os.O_RDONLY, CTX)).fh  # the cached copy, a descriptor of its own
            assert bytes(await ops.read(fh, 0, 4096)) == data[:4096]
            await wait_for(recorder.held.is_set, "the read-ahead")  # it has a descriptor of its own too
            path = tmp_path / "store" / "m" / "w.bin"
            file_ino = path.stat().st_ino
            freed = await trio.to_thread.run_sync(store.evict, ["m/w.bin"])
            assert freed == len(data) and not path.exists()
            assert bytes(await ops.read(fh, 8192, 4096)) == data[8192:8192 + 4096]  # the reader keeps its bytes
            await ops.release(fh)
            # Counted among closes of the unlinked file only: the page cache's
            # read of the first chunk may close a descriptor of its own before.
            await wait_for(lambda: unlinked_closes(recorder, file_ino) >= 1, "the reader's close")
            recorder.go.set()
            await wait_for(lambda: unlinked_closes(recorder, file_ino) >= 2, "the read-ahead's close")
    finally:
        recorder.go.set()
    unlinked = [(links, thread) for _, links, thread in recorder.closed(file_ino) if links == 0]
    assert len(unlinked) == 2, recorder.closed(file_ino)
    assert all(thread != threading.get_ident() for _, thread in unlinked), \
        "a descriptor of an unlinked file was closed on the trio thread"


@trio_test
async def test_the_last_close_of_a_discarded_download_is_not_on_the_trio_thread(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """The object changes mid-download: the partial file is discarded
    (unlinked) while a reader still has the download open; the reader's
    release closes its last descriptor, in a worker."""
    data = os.urandom(2 * MiB)
    remote.put(BUCKET, "m/w.bin", data)
    gate = remote.gate("m/w.bin", start=MiB)
    store = stores()
    fetcher = Fetcher(remote, store, fetch_config())
    recorder = RecordingOs()
    try:
        async with running(fetcher):
            ops, catalog = await ops_for(remote, fetcher)
            obj = listed(catalog, "m/w.bin")
            ino = await inode_of(ops, "m", "w.bin")
            fh = (await ops.open(ino, os.O_RDONLY, CTX)).fh
            assert bytes(await ops.read(fh, 0, 4096)) == data[:4096]
            dl = fetcher.active(obj)
            assert isinstance(dl, Download)
            partial_ino = os.fstat(dl.fd).st_ino
            remote.put(BUCKET, "m/w.bin", os.urandom(2 * MiB))  # a new version: the held GETs fail
            gate.release()
            await wait_for(lambda: dl.error is not None, "the download to fail")
            await wait_for(lambda: os.fstat(dl.fd).st_nlink == 0, "the partial file's discard")
            monkeypatch.setattr("lazyfs.fetch.os", recorder)
            await ops.release(fh)  # the download's last reader: its descriptor closes
            await wait_for(lambda: recorder.closed(partial_ino), "the last close")
    finally:
        gate.release()
    unlinked = [(links, thread) for _, links, thread in recorder.closed(partial_ino) if links == 0]
    assert unlinked, recorder.closed(partial_ino)
    assert all(thread != threading.get_ident() for _, thread in unlinked), \
        "the last link of an unlinked file was closed on the trio thread"


# -- 3. cold pages of a cached file ---------------------------------------------------------------


def major_faults() -> int:
    """Page faults that waited for the disk, of the calling thread only."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_majflt


@trio_test
async def test_reads_of_a_cold_cached_file_never_fault_on_the_trio_thread(
        remote: FakeRemote, stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached file none of whose pages are in the page cache (after a
    restart): reads through the operations find each chunk read in by a
    worker thread first (sendfile), the 16 after it read ahead while the
    reader works, and the reply's copy (here `bytes()`, on the trio thread,
    as pyfuse3's) takes no major fault."""
    chunks = 32
    data = os.urandom(chunks * CHUNK)
    remote.put(BUCKET, "m/w.bin", data)
    fetcher = Fetcher(remote, stores(), fetch_config(part_size=8 * MiB))
    recorder = RecordingOs()
    trio_thread = threading.get_ident()
    async with running(fetcher):
        ops, catalog = await ops_for(remote, fetcher)
        obj = listed(catalog, "m/w.bin")
        await downloaded(fetcher, obj)
        path = tmp_path / "store" / "m" / "w.bin"
        fd = os.open(path, os.O_RDONLY)
        try:  # a restart: the file's pages leave the page cache (it was fsynced when published)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            # Was it really cold?  A page of a chunk no read below reaches, touched here.
            mm = mmap.mmap(fd, len(data), prot=mmap.PROT_READ)
            try:
                before = major_faults()
                _ = mm[(chunks - 1) * CHUNK + 8192]
                cold_control = major_faults() - before
            finally:
                mm.close()
        finally:
            os.close(fd)
        monkeypatch.setattr("lazyfs.pagecache.os", recorder)
        ino = await inode_of(ops, "m", "w.bin")
        fh = (await ops.open(ino, os.O_RDONLY, CTX)).fh
        faults = 0
        size = 128 * 1024

        async def read(off: int) -> None:
            nonlocal faults
            before = major_faults()
            reply = await ops.read(fh, off, size)
            copied = bytes(reply)  # what pyfuse3's reply does with the buffer, on this thread
            faults += major_faults() - before
            assert copied == data[off:off + size]
            await trio.sleep(0)  # one request per step, as pyfuse3 runs them

        async with watched() as (steps, late):
            await read(0)
            assert faults == 0, f"the first read of a cold file faulted {faults} times on the trio thread"
            ahead = (1 + READ_AHEAD_CHUNKS) * CHUNK
            await wait_for(lambda: recorder.covered(0, ahead), "the chunks after the read, read ahead")
            sent = len(recorder.sendfiles)
            for off in range(size, ahead, size):  # a loader walking on: every page it wants is cached
                await read(off)
            assert len(recorder.sendfiles) == sent, "chunks read ahead were read again"
            far = 24 * CHUNK  # beyond the read-ahead: read in before the reply, unless the
            await read(far)    # kernel's own read-ahead of the store file cached it already
            assert faults == 0, "the read far ahead faulted on the trio thread"
        await ops.release(fh)
    threads = {thread for _, _, thread in recorder.sendfiles}
    print(f"\nreads of a cold cached file: {len(recorder.sendfiles)} sendfile calls on {len(threads)} worker "
          f"threads, {faults} major faults on the trio thread (a cold page touched there: {cold_control}); "
          f"{said(steps, late)}")
    assert recorder.sendfiles and trio_thread not in threads, "sendfile ran on the trio thread"
    assert faults == 0, f"{faults} page faults waited for the disk on the trio thread"


@trio_test
async def test_pages_already_cached_cost_no_thread_and_random_reads_read_nothing_ahead(
        remote: FakeRemote, stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file read just after its download (its pages still cached): a read
    asks the page cache (RWF_NOWAIT) and sends nothing to a thread.  After a
    restart (cold), a random read reads in only the chunk it wants: reading
    ahead of random reads would keep the disk busy for nothing."""
    chunks = 32
    data = os.urandom(chunks * CHUNK)
    remote.put(BUCKET, "m/w.bin", data)
    fetcher = Fetcher(remote, stores(), fetch_config(part_size=8 * MiB))
    recorder = RecordingOs()
    async with running(fetcher):
        ops, catalog = await ops_for(remote, fetcher)
        obj = listed(catalog, "m/w.bin")
        await downloaded(fetcher, obj)
        path = tmp_path / "store" / "m" / "w.bin"
        with open(path, "rb") as f:  # every page in the page cache
            while f.read(8 * MiB):
                pass
        monkeypatch.setattr("lazyfs.pagecache.os", recorder)
        ino = await inode_of(ops, "m", "w.bin")
        fh = (await ops.open(ino, os.O_RDONLY, CTX)).fh
        for off in (0, 5 * CHUNK, 20 * CHUNK + 4096):
            assert bytes(await ops.read(fh, off, 128 * 1024)) == data[off:off + 128 * 1024]
        await trio.sleep(0.2)
        assert recorder.sendfiles == [], "cached pages were read in again by a thread"
        await ops.release(fh)

        drop_from_page_cache(path)
        fh = (await ops.open(ino, os.O_RDONLY, CTX)).fh
        for off in (9 * CHUNK, 3 * CHUNK, 27 * CHUNK):  # none follows a warm chunk
            assert bytes(await ops.read(fh, off, 128 * 1024)) == data[off:off + 128 * 1024]
        await trio.sleep(0.2)
        read_in = sorted({off // CHUNK for off, _, _ in recorder.sendfiles})
        assert read_in == [3, 9, 27], f"random reads read in chunks {read_in}"
        await ops.release(fh)


# -- 4. the store's filesystem ----------------------------------------------------------------


class SilentFilesystem:
    """`Store.fsinfo` of a store on a network filesystem whose server stops
    answering after start-up: each question blocks until `answer` is set,
    and records the thread that asked."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.answer = threading.Event()
        self.asked: list[int] = []
        self.free_blocks = 1000

    def __call__(self) -> os.statvfs_result:
        self.asked.append(threading.get_ident())
        if len(self.asked) > 1:
            self.answer.wait(30)
        st = list(self.real())
        st[4] = self.free_blocks  # f_bavail: which answer the caller got
        return os.statvfs_result(st)


@trio_test
async def test_df_and_the_stats_file_never_wait_on_a_store_filesystem_that_does_not_answer(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """`df` on the mount asks the store's filesystem for its size; a store on
    NFS whose server hangs must not take every other request of the mount
    with it.  The question goes to one thread; statfs and the stats file
    report the last answer meanwhile; the next question after the answer
    comes gets a fresh one."""
    monkeypatch.setattr("lazyfs.storespace.FRESH_S", 0.0)
    monkeypatch.setattr("lazyfs.storespace.WAIT_S", 0.2)
    remote.put(BUCKET, "m/a.bin", b"a" * 1000)
    fetcher = Fetcher(remote, stores(), fetch_config())
    fs = SilentFilesystem(fetcher.store.fsinfo)
    async with running(fetcher):
        catalog = Catalog(remote, [Source(BUCKET, "m/")])
        await catalog.refresh()
        handles = Handles(fetcher)
        space = StoreSpace(fs)  # answered at start-up
        view = MountView(catalog, fetcher, handles, fetcher.store, space, "/mnt")
        ops = Operations(catalog, handles, space, stats_file=view.snapshot_bytes)
        fs.free_blocks = 7
        try:
            with trio.fail_after(10):  # a hang fails the test
                for _ in range(3):
                    assert (await ops.statfs(CTX)).f_bavail == 1000  # the start-up answer
                stats = await inode_of(ops, ".lazyfs", "stats.json")
                fh = (await ops.open(stats, os.O_RDONLY, CTX)).fh
                shown = json.loads(bytes(await ops.read(fh, 0, 1 << 20)))["store_filesystem"]
                await ops.release(fh)
                st = fetcher.store.fsinfo()
                assert shown["free_bytes"] == 1000 * st.f_frsize
                assert shown["size_bytes"] == st.f_blocks * st.f_frsize
                assert await inode_of(ops, "m", "a.bin")  # the rest of the mount answers
                assert len(fs.asked) == 2, "one thread waits on the store's filesystem, not one per request"
                fs.answer.set()
                await wait_for(lambda: not space._asking.locked(), "the late answer")
                assert (await ops.statfs(CTX)).f_bavail == 7  # asked again: the fresh answer
        finally:
            fs.answer.set()
    assert fs.asked[0] == threading.get_ident()  # start-up, before the mount serves
    assert threading.get_ident() not in fs.asked[1:], "statvfs of the store on the trio thread"


@trio_test
async def test_a_store_filesystem_that_fails_statvfs_is_logged_once_and_its_last_size_reported(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("lazyfs.storespace.FRESH_S", 0.0)
    answers: list[os.statvfs_result | OSError] = [os.statvfs("/")]

    def ask() -> os.statvfs_result:
        got = answers[-1]
        if isinstance(got, OSError):
            raise got
        return got

    space = StoreSpace(ask)
    answers.append(OSError(116, "Stale file handle"))
    for _ in range(3):
        assert await space.current() == answers[0]
    warned = [r.getMessage() for r in caplog.records if "fails statvfs" in r.getMessage()]
    assert warned == ["the store's filesystem fails statvfs ([Errno 116] Stale file handle); "
                      "reporting its last known size"]
    fresh = os.statvfs_result((1,) * 10)
    answers.append(fresh)
    assert await space.current() == fresh


def test_a_metrics_scrape_waits_on_a_hung_store_filesystem_once_then_reports_its_last_size() -> None:
    """The Prometheus thread asks the store's size itself: the scrape that
    asks first waits with the filesystem; one while it waits does not."""
    fs = SilentFilesystem(lambda: os.statvfs("/"))
    space = StoreSpace(fs)  # answered at start-up
    fs.free_blocks = 7
    first = threading.Thread(target=space.ask_blocking, daemon=True)
    first.start()
    try:
        deadline = time.monotonic() + 10
        while len(fs.asked) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(fs.asked) == 2, "the first scrape never asked"
        assert space.ask_blocking().f_bavail == 1000  # the start-up answer, at once
        assert len(fs.asked) == 2
    finally:
        fs.answer.set()
    first.join(10)
    assert space.last.f_bavail == 7
