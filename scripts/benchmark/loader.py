"""One model load, in a fresh process: the model-load scenario's child.  It
prints one JSON object on stdout.

    python -m benchmark.loader files DIR --ref REF.json
        safetensors.torch.load_file of every shard in DIR (a mount or a local copy); with --per-tensor,
        safe_open and get_tensor one tensor at a time in keys() order, as vLLM's default loader does
    python -m benchmark.loader boto3 --endpoint URL --bucket B --prefix P --dest DIR --ref REF.json
        LIST, download_file of every file (all at once, default TransferConfig), then as `files`
    python -m benchmark.loader runai --bucket B --prefix P --dest DIR --ref REF.json
        the Run:ai Model Streamer as vLLM drives it: the small files with its pull_files, then
        SafetensorsStreamer().stream_files([every shard]) and get_tensors(); endpoint, addressing and
        concurrency come from the environment (AWS_ENDPOINT_URL, RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING,
        RUNAI_STREAMER_CONCURRENCY)
    python -m benchmark.loader s3torch --endpoint URL --region R --bucket B --prefix P --ref REF.json
        s3torchconnector's S3Client (path-style): each file read whole into memory, shards by
        safetensors.torch.load

Every loader does what a model server does: read config.json,
generation_config.json, tokenizer.json and the index, then every tensor, each copied into a destination tensor allocated
(and faulted in) before the clock starts, as a model's parameters would be.
The clock starts after the imports and that allocation.  The source tensor's
dtype and shape must be the reference's; after the clock stops, each
destination is checked against the CRC64-NVME recorded when the checkpoint was
generated.  CPU seconds are the process's (all threads) while the clock ran.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from awscrt import checksums
from safetensors import safe_open
from safetensors.torch import load, load_file

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
SMALL = ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json")
Pairs = Iterable[tuple[str, torch.Tensor]]


class Sink:
    """The destination tensors, and when the first and the last arrived."""

    def __init__(self, ref: dict[str, Any]) -> None:
        self.ref = ref["tensors"]
        self.dest = {n: torch.empty(v["shape"], dtype=DTYPES[v["dtype"]]) for n, v in self.ref.items()}
        for t in self.dest.values():
            t.zero_()  # fault the destination in before the clock
        self.seen: dict[str, int] = {}
        self.bad: list[str] = []
        self.t0 = 0.0
        self.first_s: float | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def take(self, name: str, t: torch.Tensor) -> None:
        d = self.dest.get(name)
        if d is None:
            self.bad.append(f"{name}: not in the reference")
            return
        if t.dtype != d.dtype or tuple(t.shape) != tuple(d.shape):
            self.bad.append(f"{name}: {t.dtype} {tuple(t.shape)}, expected {d.dtype} {tuple(d.shape)}")
            return
        d.copy_(t)
        with self.lock:
            self.seen[name] = self.seen.get(name, 0) + 1
            if self.first_s is None:
                self.first_s = time.perf_counter() - self.t0

    def take_all(self, pairs: Pairs) -> None:
        for name, t in pairs:
            self.take(name, t)

    def check(self) -> None:
        for name, v in self.ref.items():
            n = self.seen.get(name, 0)
            if n != 1:
                self.bad.append(f"{name}: delivered {n} times")
            elif checksums.crc64nvme(self.dest[name].view(torch.uint8).numpy()) != v["crc64nvme"]:
                self.bad.append(f"{name}: bytes differ (CRC64-NVME)")


def read_small(read: Callable[[str], bytes]) -> list[str]:
    """Parse the configs, tokenizer and index as a server does; the shards, in index order."""
    docs = {name: json.loads(read(name)) for name in SMALL}
    return sorted(set(docs["model.safetensors.index.json"]["weight_map"].values()))


def from_files(folder: Path) -> Pairs:
    shards = read_small(lambda name: (folder / name).read_bytes())
    for shard in shards:
        yield from load_file(str(folder / shard)).items()


def per_tensor(folder: Path) -> Pairs:
    """As vLLM's default safetensors loader walks a checkpoint
    (`safetensors_weights_iterator`): each shard opened with `safe_open`, its
    tensors taken one at a time, in the order of `keys()`."""
    shards = read_small(lambda name: (folder / name).read_bytes())
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (vLLM's loop, as written)
                yield name, f.get_tensor(name)


def streamed(folder: Path) -> Pairs:
    """As vLLM's `--load-format runai_streamer` loads a local folder: the
    Run:ai streamer reads the shards' files itself, in parallel chunks."""
    from runai_model_streamer import SafetensorsStreamer

    shards = read_small(lambda name: (folder / name).read_bytes())
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([str(folder / shard) for shard in shards])
        yield from streamer.get_tensors()


def boto3_client(endpoint: str) -> Any:
    import boto3
    import botocore.config

    # s3rver does not understand the newer default checksums; this does not
    # change how download_file splits and fetches an object.
    cfg = botocore.config.Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                                 response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)


def via_boto3(a: argparse.Namespace, client: Any) -> Pairs:
    """Download first (every file at once), then load the local copy."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=a.bucket, Prefix=a.prefix + "/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    dest = Path(a.dest)

    def one(key: str) -> None:
        client.download_file(a.bucket, key, str(dest / key.rsplit("/", 1)[-1]))

    with ThreadPoolExecutor(max(1, len(keys))) as pool:
        list(pool.map(one, keys))
    yield from from_files(dest)


def via_runai(a: argparse.Namespace) -> Pairs:
    from runai_model_streamer import SafetensorsStreamer
    from runai_model_streamer.safetensors_streamer.safetensors_streamer import pull_files

    base = f"s3://{a.bucket}/{a.prefix}"
    pull_files(base, a.dest, ignore_pattern=["*.safetensors"])  # as vLLM fetches config and tokenizer
    shards = read_small(lambda name: (Path(a.dest) / name).read_bytes())
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([f"{base}/{s}" for s in shards])
        yield from streamer.get_tensors()


def via_s3torch(a: argparse.Namespace) -> Pairs:
    from s3torchconnector._s3client import S3Client, S3ClientConfig

    client = S3Client(a.region, endpoint=a.endpoint, s3client_config=S3ClientConfig(force_path_style=True))

    def read(name: str) -> bytes:
        return client.get_object(a.bucket, f"{a.prefix}/{name}").read()

    for shard in read_small(read):
        yield from load(read(shard)).items()


def wait_for_go(go: Path, timeout: float = 600.0) -> None:
    go.with_name(go.name + ".ready").touch()
    deadline = time.monotonic() + timeout
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no go after {timeout:g} s")
        time.sleep(0.001)


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def vmhwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchloader")
    p.add_argument("kind", choices=("files", "boto3", "runai", "s3torch"))
    p.add_argument("folder", nargs="?", help="files: the folder holding the checkpoint")
    p.add_argument("--ref", required=True, help="reference.json of the checkpoint")
    p.add_argument("--endpoint")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--bucket")
    p.add_argument("--prefix", help="key folder of the checkpoint, without a trailing slash")
    p.add_argument("--dest", help="boto3, runai: where to download to")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--per-tensor", action="store_true",
                     help="files: take tensors one at a time through safe_open, as vLLM does (default: load_file)")
    how.add_argument("--streamer", action="store_true",
                     help="files: the Run:ai streamer reads the files, as vLLM's runai_streamer loader does")
    p.add_argument("--go", help="once set up, create GO.ready and start the clock when GO exists (the harness "
                   "mounts in between)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    sink = Sink(json.loads(Path(a.ref).read_text()))
    client = boto3_client(a.endpoint) if a.kind == "boto3" else None  # built before the clock, as in the probe
    out: dict[str, Any] = {"kind": a.kind}
    if a.go:
        wait_for_go(Path(a.go))
    sink.start()
    c0 = cpu_s()
    try:
        if a.kind == "files":
            sink.take_all((per_tensor if a.per_tensor else streamed if a.streamer else from_files)(Path(a.folder)))
        elif a.kind == "boto3":
            sink.take_all(via_boto3(a, client))
        elif a.kind == "runai":
            sink.take_all(via_runai(a))
        else:
            sink.take_all(via_s3torch(a))
    except Exception as e:  # reported; the harness decides
        out["error"] = f"{type(e).__name__}: {str(e)[:1000]}"
    out["all_s"] = time.perf_counter() - sink.t0
    out["cpu_s"] = cpu_s() - c0
    out["first_s"] = sink.first_s
    out["vmhwm_kib"] = vmhwm_kib()
    if "error" not in out:
        sink.check()
    out["tensors"] = sum(sink.seen.values())
    out["bytes"] = sum(sink.dest[n].numel() * sink.dest[n].element_size() for n in sink.seen)
    out["ok"] = "error" not in out and not sink.bad
    out["bad"] = sink.bad[:5]
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    os._exit(0)  # the streamer's and the CRT's threads must not hold the exit up


if __name__ == "__main__":
    sys.exit(main())
