"""Measurements the benchmark runs as child processes; each prints one JSON
object on stdout.

A child can be killed when a filesystem hangs (a parent blocked in a FUSE call
could not be), and a page fault on an mmap of a FUSE file holds the GIL of
the process that takes it, which must never be the harness.

    python -m benchmark.probe ttfb PATH --ref LOCAL
    python -m benchmark.probe mmap PATH --ref LOCAL [--slices 64 --slice-bytes 1048576 --seed 1]
    python -m benchmark.probe verify PATH --ref LOCAL [--samples 14]
    python -m benchmark.probe hashes LISTFILE     (lines: PATH SHA256)
    python -m benchmark.probe download --endpoint URL --bucket B --dest DIR [--ref LOCAL]... KEY...
                                                 [--mmap-slices 64 ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import resource
import sys
import threading
import time
from typing import Any

MiB = 1 << 20
PAGE = 4096


def slice_offsets(size: int, slices: int, slice_bytes: int, seed: int) -> list[int]:
    """Page-aligned random offsets, the same for every system measured."""
    rnd = random.Random(seed)
    top = max(0, size - slice_bytes)
    return [rnd.randrange(0, top + 1, PAGE) if top else 0 for _ in range(slices)]


def _read_at(path: str, off: int, n: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return os.pread(f.fileno(), n, off)


def ttfb(path: str, ref: str | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    t1 = time.perf_counter()
    data = os.read(fd, 4096)
    t2 = time.perf_counter()
    os.close(fd)
    out: dict[str, Any] = {"open_ms": (t1 - t0) * 1e3, "read_ms": (t2 - t1) * 1e3, "total_ms": (t2 - t0) * 1e3}
    if ref:
        out["ok"] = data == _read_at(ref, 0, 4096)
    return out


def mmap_reads(path: str, slices: int, slice_bytes: int, seed: int, ref: str | None) -> dict[str, Any]:
    """Copy `slices` random slices out of an mmap of `path` (each copy faults
    its pages in), timing the whole from open() and the first slice."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    t_open = time.perf_counter()
    offsets = slice_offsets(size, slices, slice_bytes, seed)
    pieces, lat = [], []
    first = 0.0
    for off in offsets:
        s = time.perf_counter()
        pieces.append(mm[off:off + slice_bytes])  # the copy faults the pages in
        lat.append(time.perf_counter() - s)
        if not first:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    mm.close()
    os.close(fd)
    lat.sort()
    out: dict[str, Any] = {"total_s": total, "open_ms": (t_open - t0) * 1e3, "first_slice_ms": first * 1e3,
                           "slice_ms_p50": lat[len(lat) // 2] * 1e3, "slice_ms_max": lat[-1] * 1e3}
    if ref:
        out["ok"] = all(_read_at(ref, off, slice_bytes) == piece for off, piece in zip(offsets, pieces, strict=False))
    return out


def verify(path: str, ref: str, samples: int, seed: int = 7) -> dict[str, Any]:
    """SHA-256 of the first and last MiB and `samples` random MiB, against the local copy."""
    size = os.path.getsize(ref)
    got_size = os.path.getsize(path)
    if got_size != size:
        return {"ok": False, "why": f"size {got_size}, expected {size}"}
    n = min(MiB, size)
    offsets = [0, size - n] + slice_offsets(size, samples, n, seed)
    with open(path, "rb", buffering=0) as f:
        for off in offsets:
            if hashlib.sha256(os.pread(f.fileno(), n, off)).digest() != \
                    hashlib.sha256(_read_at(ref, off, n)).digest():
                return {"ok": False, "why": f"bytes differ at offset {off}"}
    return {"ok": True, "checked": len(offsets)}


def hashes(listfile: str) -> dict[str, Any]:
    bad = []
    pairs = [line.split() for line in open(listfile, encoding="utf-8") if line.strip()]
    for path, want in pairs:
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != want:
                bad.append(path)
    return {"ok": not bad, "checked": len(pairs), "bad": bad[:5]}


def download(a: argparse.Namespace) -> dict[str, Any]:
    """boto3 download_file with the default TransferConfig, one client per key
    (built before the clock starts), all keys at once."""
    import boto3
    import botocore.config

    # s3rver does not understand the newer default checksums; this does not
    # change how download_file splits and fetches the object.
    cfg = botocore.config.Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                                 response_checksum_validation="when_required")
    clients = [boto3.session.Session().client("s3", endpoint_url=a.endpoint, config=cfg) for _ in a.keys]
    dests = [os.path.join(a.dest, f"{i}-{os.path.basename(k)}") for i, k in enumerate(a.keys)]
    errors: list[str] = []
    ends: list[float] = [0.0] * len(a.keys)

    def one(i: int) -> None:
        try:
            clients[i].download_file(a.bucket, a.keys[i], dests[i])
        except Exception as e:  # reported, the harness decides
            errors.append(f"{a.keys[i]}: {e!r}")
        ends[i] = time.perf_counter()

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(a.keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1 = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, Any] = {"download_s": t1 - t0, "per_key_s": [e - t0 for e in ends], "errors": errors,
                           "cpu_s": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime}
    if errors:
        return out
    if a.mmap_slices:
        m = mmap_reads(dests[0], a.mmap_slices, a.slice_bytes, a.seed, None)
        out["mmap"] = m
        out["total_s"] = out["download_s"] + m["total_s"]
    if a.refs:
        checks = [verify(d, r, 6) for d, r in zip(dests, a.refs, strict=False)]
        out["ok"] = all(c["ok"] for c in checks)
    return out


def vmhwm_kib() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchprobe")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ttfb")
    s.add_argument("path")
    s.add_argument("--ref")
    s = sub.add_parser("mmap")
    s.add_argument("path")
    s.add_argument("--ref")
    s.add_argument("--slices", type=int, default=64)
    s.add_argument("--slice-bytes", type=int, default=MiB)
    s.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("verify")
    s.add_argument("path")
    s.add_argument("--ref", required=True)
    s.add_argument("--samples", type=int, default=14)
    s = sub.add_parser("hashes")
    s.add_argument("listfile")
    s = sub.add_parser("download")
    s.add_argument("--endpoint", required=True)
    s.add_argument("--bucket", required=True)
    s.add_argument("--dest", required=True)
    s.add_argument("--ref", dest="refs", action="append", default=[], help="local copy of each key, in order")
    s.add_argument("--mmap-slices", type=int, default=0)
    s.add_argument("--slice-bytes", type=int, default=MiB)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("keys", nargs="+")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.cmd == "ttfb":
        out = ttfb(a.path, a.ref)
    elif a.cmd == "mmap":
        out = mmap_reads(a.path, a.slices, a.slice_bytes, a.seed, a.ref)
    elif a.cmd == "verify":
        out = verify(a.path, a.ref, a.samples)
    elif a.cmd == "hashes":
        out = hashes(a.listfile)
    else:
        out = download(a)
    out["vmhwm_kib"] = vmhwm_kib()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
