"""The seed document's scenario, end to end against a local S3 server
(`scripts/walkthrough`): develop -> test deployment (dynamic download) ->
bake the production store -> production start (no download) -> a new version
with one changed file (only that file downloaded).  Prints what was
downloaded at each step; `run()` returns the same numbers for the tests."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from support.mountproc import MountProcess
from support.proxy import S3Proxy
from support.s3server import MotoServer, clean_env, s3_client
from support.sample import sample_model

BUCKET = "models"


@dataclass
class Step:
    name: str
    files_downloaded: list[str]
    bytes_downloaded: int


def _downloads(proxy: S3Proxy, since: int) -> tuple[list[str], int]:
    objects = [r for r in proxy.requests()[since:] if r["kind"] == "GET" and r["key"]]
    return sorted({r["key"] for r in objects}), sum(r["body_bytes"] for r in objects)


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def run(model_mib: int = 8, quiet: bool = False) -> list[Step]:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    work = Path(tempfile.mkdtemp(prefix="lazyfs-walkthrough-"))
    steps: list[Step] = []
    env = clean_env()
    try:
        with MotoServer(log_path=work / "s3.log") as server, S3Proxy(server.endpoint) as proxy:
            s3 = s3_client(server.endpoint)
            s3.create_bucket(Bucket=BUCKET)

            def record(name: str, since: int) -> None:
                files, nbytes = _downloads(proxy, since)
                steps.append(Step(name, files, nbytes))
                say(f"   downloaded from S3: {_files(len(files))}, {nbytes / 2**20:.1f} MiB"
                    + (f" ({', '.join(f.rsplit('/', 1)[-1] for f in files)})" if files else ""))

            def model_json(version: str) -> Path:
                path = work / f"model-{version}.json"
                path.write_text(json.dumps({"download_files_from": f"s3://{BUCKET}/my-model/{version}"}))
                return path

            def mount_and_load(mnt: Path, cfg: Path, version: str) -> None:
                m = MountProcess(mnt, ["--config", str(cfg), "--endpoint-url", proxy.endpoint], env,
                                 work / "lazyfs.log").start()
                try:
                    for f in sorted((mnt / "my-model" / version).iterdir()):
                        f.read_bytes()  # what the model server does at start
                finally:
                    m.stop(signal.SIGTERM)
                    m.cleanup()

            def bake(cfg: Path, to: Path) -> None:
                res = subprocess.run([sys.executable, "-m", "lazyfs", "bake", "--config", str(cfg),
                                      "--endpoint-url", proxy.endpoint, "--to", str(to)],
                                     capture_output=True, text=True, env=env, timeout=300)
                if res.returncode != 0:
                    raise RuntimeError(f"lazyfs bake failed: {res.stderr.strip()}")
                say("   " + res.stdout.strip().splitlines()[-1])

            say("1. develop: a developer uploads my-model/v3 to S3")
            v3 = sample_model(model_mib)
            for name, data in v3.items():
                s3.put_object(Bucket=BUCKET, Key=f"my-model/v3/{name}", Body=data)
                say(f"   s3://{BUCKET}/my-model/v3/{name} ({len(data):,} bytes)")

            say("2. test deployment: lazyfs mounts the cache and downloads on the fly")
            since = proxy.count()
            test_cache = work / "test-pod" / "var-practicus-cache"
            test_cache.mkdir(parents=True)
            mount_and_load(test_cache, model_json("v3"), "v3")
            record("test deployment", since)

            say("3. production image: the admin bakes the files (lazyfs bake)")
            image = work / "prod-image" / "var-practicus-cache"
            since = proxy.count()
            bake(model_json("v3"), image)
            record("bake", since)

            say("4. production start, scale-up, recovery: the same mount finds every file current")
            pod = work / "prod-pod" / "var-practicus-cache"
            shutil.copytree(image, pod, symlinks=True)  # the image's files, as a new pod sees them
            since = proxy.count()
            mount_and_load(pod, model_json("v3"), "v3")
            record("production start", since)

            say("5. new version my-model/v4: only the weights changed")
            v4 = dict(v3, **{"model.safetensors": sample_model(model_mib)["model.safetensors"][::-1]})
            for name, data in v4.items():
                s3.put_object(Bucket=BUCKET, Key=f"my-model/v4/{name}", Body=data)
            since = proxy.count()
            say("   the next image build bakes v4, starting from the last image:")
            bake(model_json("v4"), image)
            record("bake new version", since)
            since = proxy.count()
            say("   a pod of the old image switched to v4 (model.json changed), no new image:")
            mount_and_load(pod, model_json("v4"), "v4")
            record("production pod switched to the new version", since)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return steps


def main() -> int:
    p = argparse.ArgumentParser(description="the seed document's scenario against a local S3 server")
    p.add_argument("--model-mib", type=int, default=32)
    args = p.parse_args()
    steps = run(args.model_mib)
    print("\nsummary:")
    for s in steps:
        print(f"  {s.name:<45} {_files(len(s.files_downloaded)):>8}, {s.bytes_downloaded / 2**20:7.1f} MiB downloaded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
