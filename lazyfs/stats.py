"""Counters of what the process did, for the stats file and /metrics.

Plain integers, bumped without locks on the trio thread (reads, opens,
downloads), and under `Stats.lock` by worker threads (S3 requests, retries),
whose `+=` could otherwise lose an update.  A scrape reads whatever is there,
which is what a scrape of a counter means.  Latency and duration histograms
use prometheus_client, recorded once per request, not per read, and only
when metrics are served (`TIMINGS.enable`): a mount without --metrics-port
never imports prometheus_client (start-up time).
"""

from __future__ import annotations

import errno
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class Timings:
    """The latency histograms of /metrics: nothing until `enable`."""

    def __init__(self) -> None:
        self.registry: Any = None
        self._requests: Any = None
        self._downloads: Any = None

    def enable(self) -> Any:
        """Make the histograms; the registry /metrics serves."""
        from prometheus_client import CollectorRegistry, Histogram

        if self.registry is None:
            self.registry = CollectorRegistry(auto_describe=True)
            self._requests = Histogram(
                "lazyfs_s3_request_seconds", "Time from sending an S3 request to its response headers.",
                ["op"], registry=self.registry,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
            self._downloads = Histogram(
                "lazyfs_download_seconds", "Time to download, verify and publish one file.",
                registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
        return self.registry

    def request(self, op: str, seconds: float) -> None:
        if self._requests is not None:
            self._requests.labels(op).observe(seconds)

    def download(self, seconds: float) -> None:
        if self._downloads is not None:
            self._downloads.observe(seconds)


TIMINGS = Timings()


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    # Bytes returned to readers by where they came from: cached (fetched by
    # lazyfs earlier), prebaked (already on disk), s3 (arriving right now).
    served: Counter[str] = field(default_factory=Counter)
    opens_hit: int = 0  # opens served from a local copy
    opens_miss: int = 0  # opens that started or joined a download
    opens_passthrough: int = 0  # opens of local copies the kernel reads itself (passthrough.py)
    opens_direct_io: int = 0  # opens of files still arriving whose reads skip the page cache (fuse_ops.py)
    # op -> requests sent: every attempt, so each retry is one more (clientretries.py, crt.py)
    s3_requests: Counter[str] = field(default_factory=Counter)
    # op -> attempts that failed: an error status, no response, a body cut off or stalled
    s3_errors: Counter[str] = field(default_factory=Counter)
    fetched_bytes: int = 0  # body bytes received from S3
    direct_bytes: int = 0  # of those, written to the store with O_DIRECT (storewrite.py)
    # Bytes read back from the store to verify downloads (readback.read_into);
    # pieces summed as they were written need none (piecesums.py).
    verify_read_bytes: int = 0
    # Requests tried again after a failed attempt, whoever retried: botocore (any op), a ranged GET
    # resumed after its body broke off or the CRT's GET after any failure, a listing request (lister.py).
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # errno name -> count, as readers saw them
    downloads_ok: int = 0
    downloads_failed: int = 0
    linked_files: int = 0  # new paths made from identical local files
    background_errors: Counter[str] = field(default_factory=Counter)  # task -> unexpected failures (supervise.py)
    threads_refused: int = 0  # thread starts that failed: the process at its limit of threads (threads.py)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, counter: str, key: str | None = None, n: int = 1) -> None:
        """+n from a worker thread (S3 requests, failures, retries, direct bytes)."""
        with self.lock:
            if key is None:
                setattr(self, counter, getattr(self, counter) + n)
            else:
                getattr(self, counter)[key] += n

    def error(self, err: int) -> None:
        self.errors[errno.errorcode.get(err, str(err))] += 1

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_mono


STATS = Stats()
