"""Issue 11 #7 and #8 at the engine tier: the mount's background tasks (the
refresher, the cache budget's scan, the signal watcher, the ready line), each
driven as mount._serve starts it, meet an exception nobody foresaw once.  Each
time the task runs again and does its job, `background_errors{task}` counts
the failure, and one log line carries its traceback; nothing escapes to the
nursery that serves the mount (trio_test would see it)."""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import io
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, TextIO

import pyfuse3
import pytest
import trio

from lazyfs import mount
from lazyfs.budget import Budget
from lazyfs.catalog import Catalog
from lazyfs.config import MountConfig
from lazyfs.download import Download
from lazyfs.fetch import Fetcher
from lazyfs.inodes import InodeTable
from lazyfs.kernelcache import KernelCache
from lazyfs.laststop import LastStop
from lazyfs.modeljson import Source
from lazyfs.namespace import Diff, RemoteObject
from lazyfs.refresher import Refresher
from lazyfs.stats import STATS
from lazyfs.supervise import forever, once
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import Call, FakeRemote

SOURCE = Source(BUCKET, "m/")


class NoLastStop(LastStop):
    """Records that a stop armed its last resort, which here must never
    end the test process."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"), after=0)
        self.armed = 0

    def arm(self) -> None:
        self.armed += 1


class ListBug:
    """A LIST cue: once armed, the next LIST raises `exc` from the worker
    thread, as parsing a page with an unusual LastModified did (outside the
    remote call wrapper, so not a RemoteError)."""

    def __init__(self, exc: Exception, armed: bool = False) -> None:
        self.exc = exc
        self.armed = armed
        self.fired = 0
        self._lock = threading.Lock()

    def arm(self) -> None:
        with self._lock:
            self.armed = True

    def __call__(self, call: Call) -> None:
        with self._lock:
            if not self.armed:
                return
            self.armed = False
            self.fired += 1
        raise self.exc


def raises_once(exc: Exception, real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, except that its first call raises `exc`."""
    calls = []

    def wrapper(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return real(*args, **kw)

    return wrapper


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info is not None]


def assert_one_traceback(caplog: pytest.LogCaptureFixture, task: str, cause: str) -> None:
    """One log line with a traceback, the supervisor's, naming the task; the
    traceback shows the cause."""
    lines = tracebacks(caplog)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.ERROR
    assert f"background task {task} failed unexpectedly" in lines[0].getMessage()
    assert cause in logging.Formatter().formatException(lines[0].exc_info)  # type: ignore[arg-type]


# -- the refresher --------------------------------------------------------------------

@trio_test
async def test_the_refresher_survives_an_unexpected_exception_and_refreshes_again(
        remote: FakeRemote, caplog: pytest.LogCaptureFixture) -> None:
    remote.put(BUCKET, "m/a.bin", b"a")
    catalog = Catalog(remote, [SOURCE])
    changes: list[Diff] = []
    refresher = Refresher(catalog, 0.05, [changes.append])
    bug = ListBug(ValueError("time data '2024-02-30T25:61:00.000Z' does not match format"))
    remote.on_list.append(bug)
    before = STATS.background_errors["refresher"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forever, "refresher", refresher.run)  # as mount._serve starts it
        await wait_for(lambda: catalog.live, "the first listing")
        bug.arm()
        remote.put(BUCKET, "m/b.bin", b"b")
        await wait_for(lambda: bug.fired, "the refresh that meets the bug")
        await wait_for(lambda: catalog.tree.find("m/b.bin") is not None, "a refresh after the failure")
        lists = len(remote.lists())
        await wait_for(lambda: len(remote.lists()) >= lists + 2, "the refreshes to go on every interval")
        nursery.cancel_scope.cancel()
    assert STATS.background_errors["refresher"] == before + 1
    assert [[o.key for o in d.added] for d in changes] == [["m/b.bin"]], "the listeners got the change once"
    assert_one_traceback(caplog, "refresher", "does not match format")


@trio_test
async def test_a_first_listing_that_meets_an_unexpected_exception_is_tried_again(
        remote: FakeRemote, caplog: pytest.LogCaptureFixture) -> None:
    """--refresh 0: no periodic refresh would ever list again; the supervisor's
    restart is the first listing's only second chance."""
    remote.put(BUCKET, "m/a.bin", b"a")
    catalog = Catalog(remote, [SOURCE])
    remote.on_list.append(ListBug(RuntimeError("a bug in the listing"), armed=True))
    before = STATS.background_errors["refresher"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forever, "refresher", Refresher(catalog, 0).run)
        await wait_for(lambda: catalog.live, "the first listing, tried again")
        assert catalog.settled.is_set(), "the ready line did not wait for the retry"
        assert catalog.tree.find("m/a.bin") is not None
        nursery.cancel_scope.cancel()
    assert STATS.background_errors["refresher"] == before + 1
    assert_one_traceback(caplog, "refresher", "a bug in the listing")


# -- the cache budget's scan ----------------------------------------------------------

async def fetch_all(fetcher: Fetcher, objs: list[RemoteObject]) -> None:
    for obj in objs:
        dl = await fetcher.acquire(obj)
        assert isinstance(dl, Download)
        await dl.finished.wait()
        assert dl.complete, dl.error


@trio_test
async def test_the_cache_budget_scan_survives_an_unexpected_exception_and_the_budget_holds(
        remote: FakeRemote, stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The scan is what puts earlier runs' files under --cache-max-size: one
    that failed for good would leave them uncounted and never evicted."""
    objs = [remote.put(BUCKET, f"m/{i}.bin", bytes([i]) * 1000) for i in range(3)]
    store = stores()
    earlier_run = Fetcher(remote, store, fetch_config())
    async with running(earlier_run):
        await fetch_all(earlier_run, objs)
    # An EIO from a bad sector while walking the store: a raw OSError nobody caught.
    monkeypatch.setattr(store, "fetched_files",
                        raises_once(OSError(errno.EIO, "Input/output error"), store.fetched_files))
    budget = Budget(store, 2500)
    before = STATS.background_errors["cache budget"]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forever, "cache budget", budget.run)  # as mount._serve starts it (its scan first)
            await wait_for(lambda: budget.evicted_files, "the scan's retry to evict")
            nursery.cancel_scope.cancel()  # (the budget's task goes on, waiting for evictions to do)
    assert STATS.background_errors["cache budget"] == before + 1
    assert budget.evicted_files == 1 and budget.used == 2000, "the scan's retry did not do its job"
    kept = sorted(f"m/{p.name}" for p in (tmp_path / "store" / "m").iterdir())
    assert len(kept) == 2 and sorted(budget._lru) == kept
    assert_one_traceback(caplog, "cache budget", "Input/output error")


@trio_test
async def test_the_scan_evicts_the_earlier_runs_least_recently_used_file_first(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    objs = [remote.put(BUCKET, f"m/{i}.bin", bytes([i]) * 1000) for i in range(3)]
    store = stores()
    earlier_run = Fetcher(remote, store, fetch_config())
    async with running(earlier_run):
        await fetch_all(earlier_run, objs)
    for i, obj in enumerate(objs):  # read long ago: 0.bin least recently
        path = tmp_path / "store" / obj.key
        os.utime(path, ns=(10**18 + i * 10**9, path.stat().st_mtime_ns))
    await Budget(store, 2500).scan()
    assert sorted(p.name for p in (tmp_path / "store" / "m").iterdir()) == ["1.bin", "2.bin"]


# -- the signal watcher ---------------------------------------------------------------

@trio_test
async def test_the_signal_watcher_survives_an_unexpected_exception_and_still_unmounts(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A SIGHUP whose refresh request raises: the next SIGHUP refreshes, and
    SIGTERM still stops the mount."""
    monkeypatch.setattr(mount, "SHUTDOWN_GRACE_S", 0.1)
    terminated: list[int] = []
    monkeypatch.setattr(pyfuse3, "terminate", lambda: terminated.append(1))
    remote.put(BUCKET, "m/a.bin", b"a")
    catalog = Catalog(remote, [SOURCE])
    refresher = Refresher(catalog, 0)  # --refresh 0: only SIGHUP lists again
    monkeypatch.setattr(refresher, "request", raises_once(RuntimeError("a bug in the SIGHUP handler"),
                                                          refresher.request))
    fetcher = Fetcher(remote, stores(), fetch_config())
    send, receive = trio.open_memory_channel[int](10)
    stopping = trio.Event()
    before = STATS.background_errors["signals"]
    async with running(fetcher):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forever, "refresher", refresher.run)
            nursery.start_soon(forever, "signals", functools.partial(  # as mount._serve starts it
                mount._watch_signals, receive, refresher, fetcher, KernelCache(InodeTable()), stopping,
                NoLastStop(), nursery.cancel_scope))
            await wait_for(lambda: catalog.live, "the first listing")
            remote.put(BUCKET, "m/b.bin", b"b")
            await send.send(signal.SIGHUP)
            await wait_for(lambda: STATS.background_errors["signals"] > before, "the SIGHUP that fails")
            await send.send(signal.SIGHUP)
            await wait_for(lambda: catalog.tree.find("m/b.bin") is not None, "the next SIGHUP's refresh")
            await send.send(signal.SIGTERM)
            with trio.fail_after(5):
                await trio.sleep_forever()  # until the watcher cancels everything
        assert stopping.is_set() and terminated == [1]
    assert STATS.background_errors["signals"] == before + 1
    assert_one_traceback(caplog, "signals", "a bug in the SIGHUP handler")


@trio_test
async def test_sigterm_unmounts_even_when_stopping_the_downloads_raises(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Going on after a failure must not mean ignoring SIGTERM: Kubernetes
    would SIGKILL the pod and leave a dead mount behind."""
    monkeypatch.setattr(mount, "SHUTDOWN_GRACE_S", 0.1)
    terminated: list[int] = []
    monkeypatch.setattr(pyfuse3, "terminate", lambda: terminated.append(1))
    fetcher = Fetcher(remote, stores(), fetch_config())
    monkeypatch.setattr(fetcher, "close", raises_once(RuntimeError("a bug in close"), fetcher.close))
    send, receive = trio.open_memory_channel[int](10)
    stopping = trio.Event()
    last_stop = NoLastStop()
    before = STATS.background_errors["signals"]
    async with running(fetcher):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forever, "signals", functools.partial(
                mount._watch_signals, receive, Refresher(Catalog(remote, [SOURCE]), 0), fetcher,
                KernelCache(InodeTable()), stopping, last_stop,
                nursery.cancel_scope))
            await send.send(signal.SIGTERM)
            with trio.fail_after(5):
                await trio.sleep_forever()  # until the watcher cancels everything
        assert stopping.is_set() and terminated == [1]
        assert last_stop.armed == 1, "the stop never armed its last resort"

    assert STATS.background_errors["signals"] == before + 1
    assert_one_traceback(caplog, "signals", "a bug in close")


@trio_test
async def test_sigterm_stops_answering_requests_only_after_the_kernel_notifications_end(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page drop the kernel holds up (a read in flight owns a page) must end
    while the main loop still answers reads: once terminated, nothing would
    answer that read, and the drop would keep /dev/fuse open forever."""
    monkeypatch.setattr(mount, "SHUTDOWN_GRACE_S", 2.0)
    terminated: list[int] = []
    monkeypatch.setattr(pyfuse3, "terminate", lambda: terminated.append(1))
    read_answered = threading.Event()
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only=False: read_answered.wait(30))
    inodes = InodeTable()
    obj = RemoteObject(BUCKET, "m/w.bin", 1, "e", 0)
    inodes.ino(obj)
    kernel = KernelCache(inodes)
    fetcher = Fetcher(remote, stores(), fetch_config())
    send, receive = trio.open_memory_channel[int](10)
    try:
        async with running(fetcher), trio.open_nursery() as nursery:
            nursery.start_soon(forever, "signals", functools.partial(
                mount._watch_signals, receive, Refresher(Catalog(remote, [SOURCE]), 0), fetcher, kernel,
                trio.Event(), NoLastStop(), nursery.cancel_scope))
            kernel.drop_pages(obj)
            await send.send(signal.SIGTERM)
            await trio.sleep(0.5)
            assert terminated == [], "stopped answering requests with a page drop under way"
            read_answered.set()
            await wait_for(lambda: terminated == [1], "the main loop told to end")
            with trio.fail_after(10):
                await trio.sleep_forever()  # until the watcher cancels everything
    finally:
        read_answered.set()


# -- the ready line ---------------------------------------------------------------------

def broken_pipe() -> TextIO:
    """A standard output whose reader went away (`lazyfs mount | head -0`)."""
    r, w = os.pipe()
    os.close(r)
    return open(w, "w", encoding="utf-8")


def closed_file() -> TextIO:
    stream = io.StringIO()
    stream.close()
    return stream


@pytest.mark.parametrize(("make_stdout", "warning"), [
    (broken_pipe, "Broken pipe"),
    (closed_file, "closed file"),
    (lambda: None, None),  # started with `>&-`: Python's sys.stdout is None
], ids=["reader-gone", "closed-file", "no-stdout"])
@trio_test
async def test_a_ready_line_printed_to_a_closed_stdout_is_dropped_and_the_mount_goes_on(
        remote: FakeRemote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        make_stdout: Callable[[], TextIO | None], warning: str | None) -> None:
    remote.put(BUCKET, "m/a.bin", b"a")
    catalog = Catalog(remote, [SOURCE])
    await catalog.first_listing()
    cfg = MountConfig(mountpoint=tmp_path / "mnt", sources=(SOURCE,), store=tmp_path / "store")
    stdout = make_stdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    before = sum(STATS.background_errors.values())
    serving = []
    try:
        async with trio.open_nursery() as nursery:
            async def serve() -> None:  # the rest of the mount, sharing the nursery
                while True:
                    serving.append(1)
                    await trio.sleep(0.01)

            nursery.start_soon(serve)
            with trio.fail_after(5):
                await once("ready line", mount._announce, cfg, catalog)  # as mount._serve starts it
            count = len(serving)
            await wait_for(lambda: len(serving) > count, "the mount to go on")
            nursery.cancel_scope.cancel()
    finally:
        monkeypatch.undo()
        if stdout is not None:
            try:
                stdout.close()
            except OSError:  # the line still buffered for the pipe nobody reads
                pass
    assert sum(STATS.background_errors.values()) == before, "an expected condition, not a bug"
    assert not tracebacks(caplog)
    warned = [r.getMessage() for r in caplog.records if "cannot print the ready line" in r.getMessage()]
    if warning is None:
        assert warned == []
    else:
        assert len(warned) == 1 and warning in warned[0], warned


@trio_test
async def test_the_ready_line_turns_the_cyclic_collector_back_on(remote: FakeRemote, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """cli.main keeps the collector off for a mount's start-up: the ready line
    freezes what start-up made and turns it on, or the mount would never
    collect a cycle again."""
    remote.put(BUCKET, "m/a.bin", b"a")
    catalog = Catalog(remote, [SOURCE])
    await catalog.first_listing()
    cfg = MountConfig(mountpoint=tmp_path / "mnt", sources=(SOURCE,), store=tmp_path / "store")
    gc.disable()
    try:
        with trio.fail_after(5):
            await mount._announce(cfg, catalog)
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()
    assert "lazyfs: ready" in capsys.readouterr().out


@trio_test
async def test_a_listener_that_fails_does_not_keep_the_change_from_the_others(
        remote: FakeRemote, caplog: pytest.LogCaptureFixture) -> None:
    """The kernel's invalidation failing must not cost the read-ahead its news
    (nor the other way round); the refresher goes on."""
    remote.put(BUCKET, "m/a.bin", b"a")
    catalog = Catalog(remote, [SOURCE])
    await catalog.first_listing()
    got: list[Diff] = []

    def invalidate(diff: Diff) -> None:
        raise RuntimeError("invalidate_entry: kernel said no")

    refresher = Refresher(catalog, 0, [invalidate, got.append])
    remote.put(BUCKET, "m/b.bin", b"b")
    before = sum(STATS.background_errors.values())
    diff = await refresher.refresh_once()
    assert diff and [o.key for o in diff.added] == ["m/b.bin"]
    assert got == [diff], "the second listener got the change"
    assert sum(STATS.background_errors.values()) == before + 1
    lines = tracebacks(caplog)
    assert len(lines) == 1 and "invalidate" in lines[0].getMessage() and "kernel said no" in lines[0].getMessage()


def test_a_failure_inside_a_nursery_is_named_by_its_cause(caplog: pytest.LogCaptureFixture) -> None:
    """A nursery wraps a task's exception in a group of one: the log line
    names the exception inside, not "ExceptionGroup"."""
    from lazyfs.supervise import failed

    async def listing() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(_raise, ValueError("bad LastModified")))

    try:
        trio.run(listing)
    except BaseException as e:
        failed("refresher", e)
    (line,) = tracebacks(caplog)
    assert "(ValueError: bad LastModified)" in line.getMessage()


async def _raise(exc: Exception) -> None:
    raise exc


@trio_test
async def test_a_threads_last_word_after_the_engine_stopped_does_not_crash_trio(
        remote: FakeRemote, stores, tmp_path: Path) -> None:
    """A worker thread (awscrt's, after a failed request) released its pin
    on the download's descriptor only once the engine's nursery had closed:
    closing an unlinked file's last link is a task for a thread, and starting
    it raised inside trio's callback queue: TrioInternalError, and a stop
    that exited 1.  Now the close is dropped (the process is exiting)."""
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        pass
    gone = tmp_path / "discarded.part"
    gone.write_bytes(b"x")
    fd = os.open(gone, os.O_RDONLY)
    gone.unlink()
    try:
        trio.lowlevel.current_trio_token().run_sync_soon(fetcher.close_fd, fd)
        await trio.sleep(0.05)  # the callback runs: trio_test's loop must end cleanly
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
