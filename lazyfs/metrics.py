"""What the mount reports about itself: the stats file (`.lazyfs/stats.json`
in the mount root); Prometheus metrics (`--metrics-port`) read the same view
(prometheus.py).

Both are built from in-memory state only (the counters in stats.py, the
live catalog, downloads and handles, and the store filesystem's last answer
from storespace.py), so they are cheap and never wait on S3 or the store.
"""

from __future__ import annotations

import json
import time
from typing import Any

from lazyfs import __version__, redact
from lazyfs.catalog import Catalog
from lazyfs.drift import DriftWatch
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.stats import STATS
from lazyfs.store import Store
from lazyfs.storespace import StoreSpace


class MountView:
    """The pieces of a running mount that reports read."""

    def __init__(self, catalog: Catalog, fetcher: Fetcher, handles: Handles, store: Store, space: StoreSpace,
                 mountpoint: str, pinned: DriftWatch | None = None) -> None:
        self.catalog = catalog
        self.fetcher = fetcher
        self.handles = handles
        self.store = store
        self.space = space  # the store filesystem's size: its last answer
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
        fs = self.space.last
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
                        "offline": cat.offline, "state": cat.state},
            "cache": {"hits": STATS.opens_hit, "misses": STATS.opens_miss,
                      "passthrough_opens": STATS.opens_passthrough, "direct_io_opens": STATS.opens_direct_io,
                      "served_bytes": {k: STATS.served.get(k, 0) for k in ("cached", "prebaked", "s3")},
                      "bytes_published_this_run": self.fetcher.bytes_published,
                      "linked_files": STATS.linked_files,
                      "budget": None if budget is None else {
                          "max_bytes": budget.max_bytes, "used_bytes": budget.used,
                          "reserved_bytes": budget.reserved,
                          "evicted_files": budget.evicted_files, "evicted_bytes": budget.evicted_bytes}},
            "downloads": {"in_flight": downloads, "completed": STATS.downloads_ok,
                          "failed": STATS.downloads_failed, "bytes_read_to_verify": STATS.verify_read_bytes},
            "s3": {"requests": dict(STATS.s3_requests), "failed_requests": dict(STATS.s3_errors),
                   "bytes_received": STATS.fetched_bytes, "retries": STATS.retries,
                   "bytes_written_direct": STATS.direct_bytes},
            "errors": dict(STATS.errors),
            "background_errors": dict(STATS.background_errors),
            "thread_starts_refused": STATS.threads_refused,  # the process at its limit of threads (threads.py)
            "open_files": len(self.handles),
            # Inodes as `df -i` shows them (0 where the filesystem counts none: btrfs): a store can run
            # out of them with bytes to spare, and every new file is then ENOSPC.
            "store_filesystem": {"size_bytes": fs.f_blocks * fs.f_frsize,
                                 "free_bytes": fs.f_bavail * fs.f_frsize,
                                 "inodes": fs.f_files, "free_inodes": fs.f_favail,
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
        # Any URL's password masked (redact.urls): an error's words may quote the endpoint's.
        return (json.dumps(redact.urls_in(self.snapshot()), indent=2) + "\n").encode()


def _iso(ts: float) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None
