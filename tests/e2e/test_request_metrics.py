"""End to end: the request counters of /metrics and stats.json say what went
on the wire, on both transfer clients.  Every attempt is a request (botocore's
retries of a throttled GET, lazyfs's own of a body that broke off), every
attempt that failed is a failure, and every attempt after the first is a
retry: S3 throttling shows in `lazyfs_retries_total` (it showed nothing,
whoever retried)."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from support.mounting import FS, on_both_clients, wait_until
from support.proxy import Fault, S3Proxy
from support.s3server import free_port

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/m"
OPS = ("GET", "HEAD", "LIST")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {name: float(value) for name, _, value in
            (line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#"))}


def on_the_wire(proxy: S3Proxy) -> tuple[dict[str, int], dict[str, int]]:
    """Requests and failed requests the proxy saw, by op: an error status, or a body it cut or stalled."""
    requests = {op: proxy.count(op) for op in OPS}
    failed = {op: sum(1 for r in proxy.requests(op) if r["status"] >= 400 or r["fault"] in ("reset", "short", "stall"))
              for op in OPS}
    return requests, failed


def counted(metrics: dict[str, float], family: str) -> dict[str, int]:
    return {op: int(metrics.get(f'{family}{{op="{op}"}}', 0)) for op in OPS}


def stats(fs: FS, m: Any) -> dict[str, Any]:
    return dict(json.loads(fs.read(m.path / ".lazyfs" / "stats.json"))["s3"])


@pytest.mark.parametrize("faults", [
    pytest.param([Fault("status", status=503, code="SlowDown", times=3)], id="3-slowdowns"),
    pytest.param([Fault("reset", after=0, times=3), Fault("status", status=503, code="SlowDown", times=2)],
                 id="3-resets-2-slowdowns"),
    # boto3 resumes the body on a new GET; the CRT asks for the rest in parts of a block, a GET each.
    pytest.param([Fault("stall", after=0, seconds=8, times=1)], id="a-stall"),
])
def test_every_attempt_failure_and_retry_is_counted_as_the_proxy_saw_it(mount, proxy, s3, bucket, fs: FS,
                                                                       tmp_path: Path, faults: list[Fault],
                                                                       transfer_client: str):
    key = f"{P}/six.bin"
    data = os.urandom(4 * 1024 * 1024)  # one request of four blocks
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    port = free_port()
    # --retries 6: the CRT's retries are lazyfs's, 5 failures in a row.
    m = mount("--prefix", f"s3://{bucket}/{P}", "--metrics-port", str(port), "--retries", "6",
              "--part-size", "4MiB", "--read-timeout", "2", store=tmp_path / "store")
    fs.listdir(m.path / P)
    for fault in faults:
        fault.key = key
        if fault.kind == "stall" and transfer_client == "crt":
            # The CRT's first request is one block; its second, of three, is split after the stall.
            fault.min_offset = 1024 * 1024
        proxy.add(fault)
    assert fs.read(m.file(key), timeout=60) == data
    wait_until(lambda: scrape(port).get('lazyfs_downloads_total{outcome="ok"}') == 1, what="the download")
    requests, failed = on_the_wire(proxy)
    assert failed["GET"] == sum(f.times or 0 for f in faults), "the faults did not all hit"
    metrics = scrape(port)
    assert counted(metrics, "lazyfs_s3_requests_total") == requests
    assert counted(metrics, "lazyfs_s3_request_failures_total") == failed
    # Each failed attempt was tried again: every request but the first of its range is a retry.
    assert metrics["lazyfs_retries_total"] == failed["GET"]
    s = stats(fs, m)
    assert {op: s["requests"].get(op, 0) for op in OPS} == requests
    assert {op: s["failed_requests"].get(op, 0) for op in OPS} == failed
    assert s["retries"] == failed["GET"]


def test_a_throttled_listing_and_head_are_counted_too(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """botocore retries a LIST and a HEAD too: their attempts count, as a GET's.  (A file of
    several parts is fetched by ranges, which carry no checksum: a HEAD asks for it.)"""
    key = f"{P}/h.bin"
    data = os.urandom(200_000)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    port = free_port()
    proxy.add(Fault("status", method="GET", key=None, query={"list-type": "2"}, status=503, code="SlowDown",
                    times=2))
    proxy.add(Fault("status", method="HEAD", key=key, status=500, code="InternalError", times=1))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--metrics-port", str(port), "--retries", "4",
              "--part-size", "64KiB", store=tmp_path / "store")
    assert fs.listdir(m.path / P) == ["h.bin"]
    assert fs.read(m.file(key), timeout=60) == data
    wait_until(lambda: scrape(port).get('lazyfs_downloads_total{outcome="ok"}') == 1, what="the download")
    requests, failed = on_the_wire(proxy)
    metrics = scrape(port)
    assert failed["LIST"] == 2 and failed["HEAD"] == 1, "the faults did not all hit"
    assert counted(metrics, "lazyfs_s3_requests_total") == requests
    assert counted(metrics, "lazyfs_s3_request_failures_total") == failed
    assert metrics["lazyfs_retries_total"] == sum(failed.values())
