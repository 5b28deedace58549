"""What the mount reports about itself: the stats file (`.lazyfs/stats.json`
in the mount root) and Prometheus metrics (`--metrics-port`).

Both are built from in-memory state only (the counters in stats.py and the
live catalog, downloads and handles), so they are cheap and never wait on S3.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lazyfs import __version__
from lazyfs.catalog import Catalog
from lazyfs.drift import DriftWatch
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.stats import REGISTRY, STATS
from lazyfs.store import Store


class MountView:
    """The pieces of a running mount that reports read."""

    def __init__(self, catalog: Catalog, fetcher: Fetcher, handles: Handles, store: Store,
                 mountpoint: str, pinned: DriftWatch | None = None) -> None:
        self.catalog = catalog
        self.fetcher = fetcher
        self.handles = handles
        self.store = store
        self.mountpoint = mountpoint
        self.pinned = pinned  # --lock: the lock served and its drift

    def snapshot(self) -> dict[str, Any]:
        cat, last = self.catalog, self.catalog.last
        downloads = []
        for dl in self.fetcher.downloads():
            fetched = dl.fetched_bytes
            downloads.append({
                "key": dl.obj.key, "bytes": dl.obj.size, "fetched_bytes": fetched,
                "percent": round(100.0 * fetched / dl.obj.size, 1) if dl.obj.size else 100.0,
                "seconds": round(time.monotonic() - dl.started, 1), "readers": dl.readers,
                "background": dl.background and dl.readers <= 0,
                "mbps": round(dl.bytes_fetched / max(time.monotonic() - dl.started, 1e-6) / 1e6, 1)})
        budget = self.fetcher.budget
        fs = self.store.fsinfo()
        return {
            "version": __version__,
            "mountpoint": self.mountpoint,
            "store": self.store.root.path,
            "sources": [s.uri for s in cat.sources],
            "uptime_seconds": round(STATS.uptime, 1),
            "objects": cat.tree.objects,
            "bytes_listed": cat.tree.total_bytes,
            "listing": {"last_at": _iso(last.at), "ok": last.ok, "seconds": round(last.seconds, 3),
                        "objects": last.objects, "skipped_keys": last.skipped, "error": last.error,
                        "offline": cat.offline},
            "cache": {"hits": STATS.opens_hit, "misses": STATS.opens_miss,
                      "served_bytes": {k: STATS.served.get(k, 0) for k in ("cached", "prebaked", "s3")},
                      "bytes_published_this_run": self.fetcher.bytes_published,
                      "linked_files": STATS.linked_files,
                      "budget": None if budget is None else {
                          "max_bytes": budget.max_bytes, "used_bytes": budget.used,
                          "reserved_bytes": budget.reserved,
                          "evicted_files": budget.evicted_files, "evicted_bytes": budget.evicted_bytes}},
            "downloads": {"in_flight": downloads, "completed": STATS.downloads_ok,
                          "failed": STATS.downloads_failed},
            "s3": {"requests": dict(STATS.s3_requests), "failed_requests": dict(STATS.s3_errors),
                   "bytes_received": STATS.fetched_bytes, "retries": STATS.retries},
            "errors": dict(STATS.errors),
            "background_errors": dict(STATS.background_errors),
            "open_files": len(self.handles),
            "store_filesystem": {"size_bytes": fs.f_blocks * fs.f_frsize,
                                 "free_bytes": fs.f_bavail * fs.f_frsize,
                                 "user_xattrs": self.store.identities.supported},
            "pinned": self._pinned(),
        }

    def _pinned(self) -> dict[str, Any] | None:
        """The lock served, and how the bucket drifted from it (None: not pinned)."""
        if self.pinned is None:
            return None
        pin, drift = self.pinned.pin, self.pinned.drift
        return {"lock": pin.lock.path, "digest": pin.lock.digest, "files": pin.files, "bytes": pin.bytes,
                "by_version_id": pin.by_version_id, "unavailable": pin.unavailable(),
                "drift": {"checked_at": _iso(drift.checked_at), "error": drift.error or None,
                          "changed": len(drift.changed), "deleted": len(drift.deleted), "added": len(drift.added),
                          "keys": {"changed": list(drift.changed[:100]), "deleted": list(drift.deleted[:100]),
                                   "added": list(drift.added[:100])}}}

    def snapshot_bytes(self) -> bytes:
        return (json.dumps(self.snapshot(), indent=2) + "\n").encode()


def _iso(ts: float) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None


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
        reqs = CounterMetricFamily("lazyfs_s3_requests", "Requests sent to S3.", labels=["op"])
        fails = CounterMetricFamily("lazyfs_s3_request_failures", "S3 requests that failed (after botocore's "
                                    "retries).", labels=["op"])
        for op in ("GET", "HEAD", "LIST"):
            reqs.add_metric([op], STATS.s3_requests.get(op, 0))
            fails.add_metric([op], STATS.s3_errors.get(op, 0))
        yield reqs
        yield fails
        yield _counter("lazyfs_cache_hits", "Opens served from a local copy.", STATS.opens_hit)
        yield _counter("lazyfs_cache_misses", "Opens that started or joined a download.", STATS.opens_miss)
        yield _counter("lazyfs_retries", "Ranged GETs resumed after the body broke off.", STATS.retries)
        errors = CounterMetricFamily("lazyfs_errors", "Failed filesystem requests, by errno.", labels=["errno"])
        for name, n in sorted(STATS.errors.items()):
            errors.add_metric([name], n)
        yield errors
        background = CounterMetricFamily("lazyfs_background_errors", "Unexpected failures of background tasks "
                                         "(the mount went on), by task.", labels=["task"])
        for task, n in sorted(STATS.background_errors.items()):
            background.add_metric([task], n)
        yield background
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
        fs = v.store.fsinfo()
        yield _gauge("lazyfs_store_used_bytes", "Bytes used on the store's filesystem.",
                     (fs.f_blocks - fs.f_bfree) * fs.f_frsize)
        yield _gauge("lazyfs_store_free_bytes", "Bytes available on the store's filesystem.",
                     fs.f_bavail * fs.f_frsize)
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
    REGISTRY.register(MountCollector(view))
    start_http_server(port, addr=addr, registry=REGISTRY)

