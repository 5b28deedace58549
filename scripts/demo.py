"""The embedded default job (`scripts/demo`): a local S3 server with a
generated sample model, mounted the way a model container mounts it, showing
what is downloaded when."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from support.mountproc import MountProcess
from support.proxy import S3Proxy
from support.s3server import MotoServer, clean_env, s3_client
from support.sample import sample_model

BUCKET = "demo-bucket"
PREFIX = "download/files/from/my-model/v3"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    print((res.stdout + res.stderr).rstrip(), flush=True)


def timed_read(path: Path) -> tuple[str, float]:
    started = time.monotonic()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest(), time.monotonic() - started


def run(model_mib: int, keep: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="lazyfs-demo-"))
    cache = work / "var-practicus-cache"
    cache.mkdir()
    with MotoServer(log_path=work / "s3.log") as server, S3Proxy(server.endpoint) as proxy:
        step(f"local S3 server at {server.endpoint}; uploading a {model_mib} MiB sample model")
        s3 = s3_client(server.endpoint)
        s3.create_bucket(Bucket=BUCKET)
        files = sample_model(model_mib)
        for name, data in files.items():
            s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}", Body=data)
            print(f"  s3://{BUCKET}/{PREFIX}/{name}  {len(data):>10,} bytes")
        model_json = work / "model.json"
        model_json.write_text(json.dumps({"download_files_from": f"s3://{BUCKET}/{PREFIX}",
                                          "download_files_to": str(cache)}, indent=2))
        step("model.json")
        print(model_json.read_text())

        def mount() -> MountProcess:
            # What the container runs: lazyfs mount --config model.json
            m = MountProcess(cache, ["--config", str(model_json), "--endpoint-url", proxy.endpoint],
                             clean_env(), work / "lazyfs.log")
            return m.start()

        step(f"lazyfs mount --config model.json   (mounts at {cache})")
        m = mount()
        print(m.stdout_lines[0])
        folder = cache / PREFIX
        try:
            step("ls -l: every object is listed with its real size, nothing is downloaded")
            show(["ls", "-l", str(folder)])
            print(f"GET requests to S3 so far: {proxy.count('GET')}")

            weights = folder / "model.safetensors"
            expected = hashlib.sha256(files["model.safetensors"]).hexdigest()
            step("first read of model.safetensors: fetched from S3 while it is read")
            digest, secs = timed_read(weights)
            gets = proxy.count("GET")
            print(f"read {model_mib} MiB in {secs:.2f} s, sha256 {'matches' if digest == expected else 'DIFFERS'}; "
                  f"GET requests to S3: {gets} ({proxy.bytes_sent() / 2**20:.1f} MiB)")

            step("second read: served from the local copy")
            digest, secs = timed_read(weights)
            print(f"read {model_mib} MiB in {secs:.3f} s, sha256 {'matches' if digest == expected else 'DIFFERS'}; "
                  f"GET requests to S3: {proxy.count('GET')} (no new download)")
        finally:
            code = m.stop(signal.SIGTERM)
            m.cleanup()
        step(f"SIGTERM: lazyfs unmounted and exited {code}; the file stays in the cache folder")
        show(["ls", "-l", str(folder)])

        step("restart (a new pod on the same cache): no download at all")
        proxy.clear()
        m = mount()
        try:
            digest, secs = timed_read(folder / "model.safetensors")
            print(f"read {model_mib} MiB in {secs:.3f} s after the restart; GET requests to S3: "
                  f"{proxy.count('GET')}")
        finally:
            m.stop(signal.SIGTERM)
            m.cleanup()
        print(f"\nlazyfs log: {work / 'lazyfs.log'}" if keep else "")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description="lazyfs demo on a local S3 server")
    p.add_argument("--model-mib", type=int, default=64, help="size of the sample checkpoint")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder and logs")
    args = p.parse_args()
    return run(args.model_mib, args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
