"""Prometheus metrics (`--metrics-port`): the mount's in-memory state, read at
scrape time, and the latency histograms of stats.TIMINGS.  Imported only
when metrics are served."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lazyfs.drift import DriftWatch
from lazyfs.metrics import MountView
from lazyfs.stats import STATS, TIMINGS


class MountCollector(Collector):
    """Prometheus view of the same state, computed at scrape time."""

    def __init__(self, view: MountView) -> None:
        self.view = view

    def collect(self) -> Iterator[Any]:
        v = self.view
        served = CounterMetricFamily("lazyfs_read_bytes", "Bytes returned to readers, by where they came from.",
                                     labels=["source"])
        for source in ("cached", "prebaked", "s3"):
            served.add_metric([source], STATS.served.get(source, 0))
        yield served
        yield _counter("lazyfs_fetched_bytes", "Body bytes downloaded from S3.", STATS.fetched_bytes)
        yield _counter("lazyfs_direct_write_bytes", "Downloaded bytes written to the store with O_DIRECT.",
                       STATS.direct_bytes)
        yield _counter("lazyfs_verify_read_bytes", "Bytes read back from the store to verify downloads "
                       "(none for pieces whose CRCs were summed as they arrived).", STATS.verify_read_bytes)
        reqs = CounterMetricFamily("lazyfs_s3_requests", "Requests sent to S3, every attempt (a retry is one "
                                   "more).", labels=["op"])
        fails = CounterMetricFamily("lazyfs_s3_request_failures", "S3 requests (attempts) that failed: an error "
                                    "status, no response, a body cut off or stalled; most are retried.",
                                    labels=["op"])
        for op in ("GET", "HEAD", "LIST"):
            reqs.add_metric([op], STATS.s3_requests.get(op, 0))
            fails.add_metric([op], STATS.s3_errors.get(op, 0))
        yield reqs
        yield fails
        yield _counter("lazyfs_cache_hits", "Opens served from a local copy.", STATS.opens_hit)
        yield _counter("lazyfs_cache_misses", "Opens that started or joined a download.", STATS.opens_miss)
        yield _counter("lazyfs_passthrough_opens", "Opens of local copies the kernel reads itself.",
                       STATS.opens_passthrough)
        yield _counter("lazyfs_direct_io_opens", "Opens of files still downloading whose reads skip the page cache.",
                       STATS.opens_direct_io)
        yield _counter("lazyfs_retries", "S3 requests tried again after a failed attempt (botocore's retries "
                       "and lazyfs's own).", STATS.retries)
        errors = CounterMetricFamily("lazyfs_errors", "Failed filesystem requests, by errno.", labels=["errno"])
        for name, n in sorted(STATS.errors.items()):
            errors.add_metric([name], n)
        yield errors
        background = CounterMetricFamily("lazyfs_background_errors", "Unexpected failures of background tasks "
                                         "(the mount went on), by task.", labels=["task"])
        for task, n in sorted(STATS.background_errors.items()):
            background.add_metric([task], n)
        yield background
        yield _counter("lazyfs_thread_starts_refused", "Threads that could not be started: the process at its "
                       "limit of threads (its cgroup's pids.max, ulimit -u).", STATS.threads_refused)
        outcomes = CounterMetricFamily("lazyfs_downloads", "Downloads finished, by outcome.", labels=["outcome"])
        outcomes.add_metric(["ok"], STATS.downloads_ok)
        outcomes.add_metric(["failed"], STATS.downloads_failed)
        outcomes.add_metric(["linked"], STATS.linked_files)
        yield outcomes
        yield _gauge("lazyfs_downloads_in_flight", "Downloads in progress.", len(v.fetcher.downloads()))
        yield _gauge("lazyfs_open_files", "Files open through the mount.", len(v.handles))
        yield _gauge("lazyfs_objects", "Objects in the current listing.", v.catalog.tree.objects)
        yield _gauge("lazyfs_offline", "1 while serving from the store alone.", int(v.catalog.offline))
        yield _gauge("lazyfs_listing_last_success_timestamp_seconds", "When the last listing succeeded.",
                     v.catalog.last.at if v.catalog.last.ok else 0)
        fs = v.space.ask_blocking()  # this thread may wait on the store; the mount never does
        yield _gauge("lazyfs_store_used_bytes", "Bytes used on the store's filesystem.",
                     (fs.f_blocks - fs.f_bfree) * fs.f_frsize)
        yield _gauge("lazyfs_store_free_bytes", "Bytes available on the store's filesystem.",
                     fs.f_bavail * fs.f_frsize)
        yield _gauge("lazyfs_store_inodes", "Inodes of the store's filesystem (0: it counts none).", fs.f_files)
        yield _gauge("lazyfs_store_free_inodes", "Inodes available on the store's filesystem: at 0, every new "
                     "file is ENOSPC, however many bytes are free.", fs.f_favail)
        if v.fetcher.budget is not None:
            yield _gauge("lazyfs_cache_budget_used_bytes", "Fetched bytes counted against --cache-max-size.",
                         v.fetcher.budget.used)
        yield from _pinned_metrics(v.pinned)


def _pinned_metrics(pinned: DriftWatch | None) -> Iterator[Any]:
    yield _gauge("lazyfs_pinned", "1 when the mount serves a lock (--lock).", int(pinned is not None))
    if pinned is None:
        return
    info = GaugeMetricFamily("lazyfs_lock_info", "The lock served (always 1).", labels=["digest", "path"])
    info.add_metric([pinned.pin.lock.digest, pinned.pin.lock.path], 1)
    yield info
    drift = pinned.drift
    kinds = GaugeMetricFamily("lazyfs_pinned_drift_objects", "Objects changed, deleted or added in the bucket "
                              "since the lock, at the last drift check.", labels=["kind"])
    for kind, keys in (("changed", drift.changed), ("deleted", drift.deleted), ("added", drift.added)):
        kinds.add_metric([kind], len(keys))
    yield kinds
    yield _gauge("lazyfs_pinned_drift_checked_timestamp_seconds", "When the bucket was last compared with the "
                 "lock (0: not yet).", drift.checked_at)
    yield _gauge("lazyfs_pinned_unavailable_objects", "Locked versions the bucket no longer has: served only "
                 "from a copy in the store.", len(pinned.pin.unavailable()))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def serve_metrics(view: MountView, addr: str, port: int) -> None:
    """Expose /metrics on addr:port (a daemon thread of prometheus_client's)."""
    registry = TIMINGS.enable()
    registry.register(MountCollector(view))
    start_http_server(port, addr=addr, registry=registry)

