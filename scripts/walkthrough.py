"""The seed document's scenario, end to end against a local S3 server
(`scripts/walkthrough`): develop -> test deployment (dynamic download) ->
bake the production store -> production start (no download) -> a new version
with one changed file (only that file downloaded).

Then the pinned path (issue 14), in a bucket that keeps versions: the
approved version is locked, baked with its lock, and overwritten in the
bucket; the prebaked pinned pod and a lock-only pod still serve the approved
bytes (a dynamic pod serves the new ones); a v4 lock, `lazyfs diff`, the v4
files pre-staged next to the running pod, and a switch that downloads
nothing.  Prints what was downloaded (and asked) at each step; `run()`
returns the same numbers for the tests."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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
    requests: dict[str, int] = field(default_factory=dict)  # every request to S3, by kind (GET, HEAD, LIST)
    approved: bool | None = None  # served exactly the approved v3 bytes (None: not a serving step)
    by_version_id: bool = False  # every GET named the version it wanted (?versionId=)
    predicted: bool = False  # what a switch would download (lazyfs diff), not a download


def _downloads(proxy: S3Proxy, since: int) -> tuple[list[str], int]:
    objects = [r for r in proxy.requests()[since:] if r["kind"] == "GET" and r["key"]]
    return sorted({r["key"] for r in objects}), sum(r["body_bytes"] for r in objects)


def _requests(proxy: S3Proxy, since: int) -> tuple[dict[str, int], bool]:
    done = proxy.requests()[since:]
    gets = [r for r in done if r["kind"] == "GET" and r["key"]]
    return dict(Counter(r["kind"] for r in done)), bool(gets) and all(r["query"].get("versionId") for r in gets)


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


class _Walk:
    """What every step needs: the S3 server behind the counting proxy, a
    work folder, the CLI and mounts as a user runs them, and the record."""

    def __init__(self, work: Path, proxy: S3Proxy, say: Callable[..., None]) -> None:
        self.work = work
        self.proxy = proxy
        self.say = say
        self.env = clean_env()
        self.steps: list[Step] = []
        self.since = 0

    def begin(self) -> None:
        self.since = self.proxy.count()

    def record(self, name: str, approved: bool | None = None, predicted: tuple[list[str], int] | None = None) -> Step:
        files, nbytes = predicted or _downloads(self.proxy, self.since)
        requests, by_version_id = _requests(self.proxy, self.since)
        step = Step(name, files, nbytes, requests, approved, by_version_id, predicted is not None)
        self.steps.append(step)
        asked = ", ".join(f"{n} {kind}" for kind, n in sorted(requests.items())) or "none"
        verb = "the switch would download" if predicted else "downloaded from S3"
        self.say(f"   {verb}: {_files(len(files))}, {nbytes / 2**20:.1f} MiB"
                 + (f" ({', '.join(f.rsplit('/', 1)[-1] for f in files)})" if files else "")
                 + ("" if predicted else f"; requests to S3: {asked}")
                 + (" (every GET by version id)" if by_version_id else ""))
        return step

    def model_json(self, version: str) -> Path:
        path = self.work / f"model-{version}.json"
        path.write_text(json.dumps({"download_files_from": f"s3://{BUCKET}/my-model/{version}"}))
        return path

    def lazyfs(self, *args: str) -> str:
        """A CLI command against the proxy; its output (the last line shown)."""
        res = subprocess.run([sys.executable, "-m", "lazyfs", *args, "--endpoint-url", self.proxy.endpoint],
                             capture_output=True, text=True, env=self.env, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"lazyfs {args[0]} failed: {res.stderr.strip()}")
        return res.stdout

    def bake(self, *args: str) -> None:
        self.say("   " + self.lazyfs("bake", *args).strip().splitlines()[-1])

    @contextlib.contextmanager
    def mounted(self, mnt: Path, *args: str, show: bool = False) -> Iterator[MountProcess]:
        mnt.mkdir(parents=True, exist_ok=True)
        m = MountProcess(mnt, [*args, "--endpoint-url", self.proxy.endpoint], self.env,
                         self.work / "lazyfs.log").start()
        if show:
            self.say("   " + m.stdout_lines[0])
        try:
            yield m
        finally:
            m.stop(signal.SIGTERM)
            m.cleanup()

    def mount_and_load(self, mnt: Path, version: str, *args: str, show: bool = False) -> dict[str, bytes]:
        """A pod's start: mount, read every file as the model server does, stop."""
        with self.mounted(mnt, *args, show=show):
            return load(mnt, version)


def load(mnt: Path, version: str) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((mnt / "my-model" / version).iterdir())}


def run(model_mib: int = 8, quiet: bool = False) -> list[Step]:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    work = Path(tempfile.mkdtemp(prefix="lazyfs-walkthrough-"))
    try:
        with MotoServer(log_path=work / "s3.log") as server, S3Proxy(server.endpoint) as proxy:
            s3 = s3_client(server.endpoint)
            s3.create_bucket(Bucket=BUCKET)
            # A bucket that keeps versions (the pinned path fetches by version id).
            s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
            walk = _Walk(work, proxy, say)
            v3 = _seed(walk, s3, model_mib)
            _pinned(walk, s3, model_mib, v3)
            return walk.steps
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _seed(w: _Walk, s3: Any, model_mib: int) -> dict[str, bytes]:
    """The seed document's scenario."""
    w.say("1. develop: a developer uploads my-model/v3 to S3")
    v3 = sample_model(model_mib)
    for name, data in v3.items():
        s3.put_object(Bucket=BUCKET, Key=f"my-model/v3/{name}", Body=data)
        w.say(f"   s3://{BUCKET}/my-model/v3/{name} ({len(data):,} bytes)")

    w.say("2. test deployment: lazyfs mounts the cache and downloads on the fly")
    w.begin()
    w.mount_and_load(w.work / "test-pod" / "var-practicus-cache", "v3", "--config", str(w.model_json("v3")))
    w.record("test deployment")

    w.say("3. production image: the admin bakes the files (lazyfs bake)")
    image = w.work / "prod-image" / "var-practicus-cache"
    w.begin()
    w.bake("--config", str(w.model_json("v3")), "--to", str(image))
    w.record("bake")

    w.say("4. production start, scale-up, recovery: the same mount finds every file current")
    pod = w.work / "prod-pod" / "var-practicus-cache"
    shutil.copytree(image, pod, symlinks=True)  # the image's files, as a new pod sees them
    w.begin()
    w.mount_and_load(pod, "v3", "--config", str(w.model_json("v3")))
    w.record("production start")

    w.say("5. new version my-model/v4: only the weights changed")
    v4 = dict(v3, **{"model.safetensors": sample_model(model_mib)["model.safetensors"][::-1]})
    for name, data in v4.items():
        s3.put_object(Bucket=BUCKET, Key=f"my-model/v4/{name}", Body=data)
    w.begin()
    w.say("   the next image build bakes v4, starting from the last image:")
    w.bake("--config", str(w.model_json("v4")), "--to", str(image))
    w.record("bake new version")
    w.begin()
    w.say("   a pod of the old image switched to v4 (model.json changed), no new image:")
    w.mount_and_load(pod, "v4", "--config", str(w.model_json("v4")))
    w.record("production pod switched to the new version")
    return v3


def _pinned(w: _Walk, s3: Any, model_mib: int, v3: dict[str, bytes]) -> None:
    """The pinned path: the approved bytes, whatever the bucket holds later."""
    v3_lock, v4_lock = w.work / "model-v3.lock.json", w.work / "model-v4.lock.json"
    w.say("6. pinned: the admin approves the tested my-model/v3 and locks it (lazyfs lock)")
    w.begin()
    w.say("   " + w.lazyfs("lock", "--config", str(w.model_json("v3")), "-o", str(v3_lock)).strip())
    w.record("lock v3")

    w.say("7. pinned: the production image is baked with the lock (lazyfs bake --lock)")
    image = w.work / "pinned-image" / "opt-lazyfs-store"
    w.begin()
    w.bake("--lock", str(v3_lock), "--to", str(image))
    w.record("bake with the lock")

    w.say("8. someone overwrites my-model/v3/model.safetensors in the bucket (a botched re-upload)")
    s3.put_object(Bucket=BUCKET, Key="my-model/v3/model.safetensors",
                  Body=sample_model(model_mib)["model.safetensors"][::-1])

    w.say("9. pinned production start (prebaked + lock): the approved bytes, no request at all")
    pod = w.work / "pinned-pod"
    shutil.copytree(image, pod / "opt-lazyfs-store", symlinks=True)
    w.begin()
    served = w.mount_and_load(pod / "var-practicus-cache", "v3", "--lock", str(v3_lock), "--store",
                              str(pod / "opt-lazyfs-store"), show=True)
    w.record("pinned production start", approved=served == v3)

    w.say("10. a lock-only pod (the image carries only the lock): the approved bytes, fetched by version id")
    w.begin()
    served = w.mount_and_load(w.work / "lock-only-pod" / "var-practicus-cache", "v3", "--lock", str(v3_lock))
    w.record("lock-only pod", approved=served == v3)

    w.say("11. for contrast, a dynamic pod (no lock) serves whatever the bucket holds now")
    w.begin()
    served = w.mount_and_load(w.work / "dynamic-pod" / "var-practicus-cache", "v3", "--config",
                              str(w.model_json("v3")))
    w.record("dynamic pod after the overwrite", approved=served == v3)

    w.say("12. my-model/v4 is approved: its lock, and what switching to it costs (lazyfs diff)")
    w.begin()
    w.say("   " + w.lazyfs("lock", "--config", str(w.model_json("v4")), "-o", str(v4_lock)).strip())
    w.record("lock v4")
    w.begin()
    diff = subprocess.run([sys.executable, "-m", "lazyfs", "diff", str(v3_lock), str(v4_lock)],
                          capture_output=True, text=True, env=w.env, timeout=60, check=True).stdout
    w.say("\n".join("   " + line for line in diff.strip().splitlines()))
    switch = json.loads(subprocess.run([sys.executable, "-m", "lazyfs", "diff", "--json", str(v3_lock),
                                        str(v4_lock)], capture_output=True, text=True, env=w.env, timeout=60,
                                       check=True).stdout)
    w.record("diff v3 -> v4", predicted=(switch["download"]["keys"], switch["download"]["bytes"]))

    w.say("13. pre-staging: v4 baked into the running production pod's store, next to its v3 mount")
    mnt, store = pod / "var-practicus-cache", pod / "opt-lazyfs-store"
    with w.mounted(mnt, "--lock", str(v3_lock), "--store", str(store)):
        w.begin()
        w.bake("--lock", str(v4_lock), "--to", str(store))
        w.record("pre-stage v4", approved=load(mnt, "v3") == v3)

    w.say("14. the switch: the pod restarts with the v4 lock")
    w.begin()
    served = w.mount_and_load(mnt, "v4", "--lock", str(v4_lock), "--store", str(store), show=True)
    w.record("switch to v4")
    if served["model.safetensors"] != sample_model(model_mib)["model.safetensors"][::-1]:
        raise RuntimeError("the switched pod does not serve v4")


def main() -> int:
    p = argparse.ArgumentParser(description="the seed document's scenario against a local S3 server")
    p.add_argument("--model-mib", type=int, default=32)
    args = p.parse_args()
    steps = run(args.model_mib)
    print("\nsummary:")
    for s in steps:
        asked = ", ".join(f"{n} {kind}" for kind, n in sorted(s.requests.items())) or "no request"
        served = {None: "", True: "; served the approved v3 bytes", False: "; served other bytes"}[s.approved]
        print(f"  {s.name:<45} {_files(len(s.files_downloaded)):>8}, {s.bytes_downloaded / 2**20:7.1f} MiB "
              + ("to download at the switch (no request)" if s.predicted else f"downloaded ({asked}){served}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
