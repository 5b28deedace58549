"""The container scenarios of `scripts/container-test` (issue 12), run with podman.

  build      the Dockerfile's `runtime` target, unchanged (its final stage must
             carry no compiler and no headers of its own)
  runtime    `podman run --device /dev/fuse --cap-add SYS_ADMIN` against a local
             S3 server (moto behind the counting proxy of tests/support) on the
             host network; a SECOND container reads the model through a host
             folder bound rshared (lazyfs) / rslave (reader) and checks sha256;
             then a container with `--security-opt no-new-privileges` and a
             read-only root (only the store writable) on the same store, and a
             `podman restart` of it: restarts download nothing (GETs counted
             at the proxy)
  production `--target production` with the credentials as a build secret
             (random values, so any trace is found) and the model's lock: no
             layer, history entry or image config contains them; the bake
             shows progress in the build log; a container from the image
             (pinned by its lock) serves every file with no request at all,
             and its readiness probe proves the store matches the lock
  kube       `podman kube play` of the README's pod spec, dynamic and prebaked,
             read through the model-server container, the readiness probe run
             by hand, `podman pod stop` (SIGTERM: lazyfs exits 0), then
             `podman kube down`, with nothing left mounted

Every podman call runs under a timeout; every container, pod and mount this
run made is removed at the end, whatever happened.  Run it through
`scripts/container-test`, which installs podman and the base image first.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from lazyfs.passthrough import kernel_passes_through
from support.mountproc import force_unmount
from support.proxy import Fault, S3Proxy
from support.s3server import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, clean_env, free_port, s3_client
from support.sample import sample_model

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
RUNTIME = "localhost/lazyfs-ct:runtime"
PRODUCTION = "localhost/lazyfs-ct:production"
NAME = "lazyfs-ct"  # prefix of every container this run creates
POD = "my-model"  # the README's pod name
BUCKET = "models"
FOLDER = "download/files/from/my-model/v1"
MOUNT = "/var/practicus/cache"
MIN_CAPS = ["--device", "/dev/fuse", "--cap-add", "SYS_ADMIN"]
# The README's probe for a pinned pod: it asks the mount (no --store), so a
# mount that stopped answering is not ready.
PINNED_PROBE = ["lazyfs", "status", "--lock", "/app/model.lock.json", "--require-all"]


class Failed(AssertionError):
    pass


def check(cond: Any, what: str) -> None:
    if not cond:
        raise Failed(what)


def say(msg: str) -> None:
    print(f"[container-test] {msg}", file=sys.stderr, flush=True)


@dataclass
class Podman:
    """`podman ...` under a timeout, every call logged to a file."""

    log_path: Path
    containers: set[str] = field(default_factory=set)

    def __call__(self, *args: str, timeout: float = 120, check: bool = True,
                 log_output: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["podman", *args]
        with open(self.log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                log.write(f"(timed out after {timeout} s)\n")
                raise Failed(f"timed out after {timeout} s: {' '.join(cmd)}") from None
            if log_output:
                log.write(res.stdout + res.stderr)
            log.write(f"(exit {res.returncode})\n")
        if check and res.returncode != 0:
            raise Failed(f"{' '.join(cmd[:4])}... exited {res.returncode}: {res.stderr.strip()[-1500:]}")
        return res

    def run_detached(self, name: str, *args: str) -> None:
        self.containers.add(name)
        self("run", "-d", "--name", name, *args)

    def exit_code(self, name: str) -> int:
        return int(self("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())

    def running(self, name: str) -> bool:
        res = self("inspect", "--format", "{{.State.Running}}", name, check=False)
        return res.stdout.strip() == "true"

    def logs(self, name: str) -> str:
        res = self("logs", name, check=False, log_output=False)
        return res.stdout + res.stderr

    def remove_all(self) -> None:
        for name in sorted(self.containers):
            self("rm", "-f", "-t", "10", name, check=False, timeout=60)
        self.containers.clear()


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def fuse_mounts_under(path: Path) -> list[str]:
    """FUSE mounts at or below `path` in this (the host's) mount namespace."""
    root = str(path)
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f
                if line.split()[2].startswith("fuse") and line.split()[1].startswith(root)]


class SharedFolder:
    """A host folder bind-mounted onto itself and made rshared: the FUSE
    container binds it `:rshared`, readers `:rslave`, so the mount made in
    one container reaches the others (what a kubelet does for Bidirectional
    and HostToContainer propagation)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> SharedFolder:
        (self.path / "cache").mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(self.path), str(self.path)], check=True, timeout=30)
        subprocess.run(["mount", "--make-rshared", str(self.path)], check=True, timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        for m in sorted(fuse_mounts_under(self.path), reverse=True):
            force_unmount(m)
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=30)


@dataclass
class Model:
    files: dict[str, bytes]

    def digests(self) -> dict[str, str]:
        return {f"{MOUNT}/{FOLDER}/{k}": hashlib.sha256(v).hexdigest() for k, v in self.files.items()}


class Run:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.podman = Podman(work / "podman.log")
        self.results: dict[str, Any] = {}
        self.model = Model({})
        self.s3: Any = None
        self.proxy: S3Proxy | None = None
        self.shared = work / "practicus"

    # -- helpers ---------------------------------------------------------------

    def timed(self, label: str, fn: Callable[[], Any]) -> Any:
        say(f"{label} ...")
        started = time.monotonic()
        out = fn()
        secs = round(time.monotonic() - started, 1)
        self.results.setdefault("seconds", {})[label] = secs
        say(f"{label}: ok ({secs} s)")
        return out

    def s3_env(self, endpoint: str | None = None) -> list[str]:
        assert self.proxy is not None
        return ["-e", f"AWS_ACCESS_KEY_ID={ACCESS_KEY}", "-e", f"AWS_SECRET_ACCESS_KEY={SECRET_KEY}",
                "-e", f"AWS_REGION={REGION}", "-e", f"AWS_ENDPOINT_URL={endpoint or self.proxy.endpoint}"]

    def gets(self) -> int:
        assert self.proxy is not None
        return self.proxy.count("GET")

    def wait_ready(self, name: str, times: int = 1, timeout: float = 60) -> None:
        def ready() -> bool:
            if not self.podman.running(name):
                raise Failed(f"{name} exited {self.podman.exit_code(name)}:\n{self.podman.logs(name)[-3000:]}")
            return self.podman.logs(name).count("lazyfs: ready") >= times
        wait_for(ready, timeout, f"{name} to print its ready line")

    def read_in_second_container(self, tag: str, user: str = "0:0") -> None:
        """sha256 of every file through the shared folder, from another container."""
        name = f"{NAME}-reader-{tag}"
        self.podman.containers.add(name)
        res = self.podman("run", "--rm", "--name", name, "--network", "none", "--user", user,
                          "-v", f"{self.shared}:/var/practicus:rslave", BASE_IMAGE,
                          "sha256sum", *self.model.digests(), timeout=90)
        self.podman.containers.discard(name)
        self.check_digests(res.stdout, f"read through a second container ({tag})")

    def check_digests(self, sha256sum_output: str, where: str) -> None:
        got = {line.split(None, 1)[1].strip(): line.split()[0] for line in sha256sum_output.splitlines()}
        check(got == self.model.digests(), f"{where}: sha256 differs: {got}")

    def stop_cleanly(self, name: str) -> None:
        self.podman("stop", "-t", "30", name, timeout=60)
        code = self.podman.exit_code(name)
        check(code == 0, f"{name} exited {code} on SIGTERM:\n{self.podman.logs(name)[-3000:]}")
        left = fuse_mounts_under(self.shared)
        check(not left, f"still mounted after {name} stopped: {left}")

    # -- set-up ----------------------------------------------------------------

    def upload_model(self, endpoint: str) -> None:
        self.s3 = s3_client(endpoint)
        self.s3.create_bucket(Bucket=BUCKET)
        self.model = Model(sample_model(model_mib=24))
        for name, data in self.model.files.items():
            self.s3.put_object(Bucket=BUCKET, Key=f"{FOLDER}/{name}", Body=data)
        (self.work / "model.json").write_text(json.dumps(
            {"download_files_from": f"s3://{BUCKET}/{FOLDER}", "download_files_to": MOUNT}))

    def lock_model(self, endpoint: str) -> None:
        """The lock the production image is baked and mounted with (README,
        "Pinned deployments"): made once the tested version is approved, so it
        holds the file added during the runtime scenario."""
        res = subprocess.run([sys.executable, "-m", "lazyfs", "lock", "--config", str(self.work / "model.json"),
                              "--endpoint-url", endpoint, "-o", str(self.work / "model.lock.json")],
                             capture_output=True, text=True, timeout=120, env=clean_env())
        check(res.returncode == 0, f"lazyfs lock failed: {res.stderr[-2000:]}")
        locked = sum(len(f["objects"]) for f in json.loads((self.work / "model.lock.json").read_text())["folders"])
        check(locked == len(self.model.files), f"the lock holds {locked} files, the folder {len(self.model.files)}")

    def add_file(self, name: str, data: bytes) -> None:
        self.s3.put_object(Bucket=BUCKET, Key=f"{FOLDER}/{name}", Body=data)
        self.model.files[name] = data

    # -- build -----------------------------------------------------------------

    def build_runtime(self) -> None:
        log = self.work / "build-runtime.log"
        res = self.podman("build", "--target", "runtime", "-t", RUNTIME, str(REPO), timeout=900, check=False)
        log.write_text(res.stdout + res.stderr)
        check(res.returncode == 0, f"the runtime build failed (see {log}):\n{res.stderr[-3000:]}")
        res = self.podman("run", "--rm", "--entrypoint", "sh", RUNTIME, "-c",
                          "for c in gcc cc c++ make pkg-config; do command -v $c; done;"
                          " ls -d /usr/include/fuse3 /usr/lib/gcc 2>/dev/null; lazyfs --help >/dev/null && echo ok",
                          check=False)
        check(res.stdout.strip() == "ok", f"the runtime image carries build tools or does not run: {res.stdout!r}")
        self.results["images"] = {"runtime": self.image_size(RUNTIME), "base": self.image_size(BASE_IMAGE)}

    def image_size(self, image: str) -> int:
        return int(self.podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    # -- (a) runtime -------------------------------------------------------------

    def runtime_scenario(self) -> None:
        store = self.work / "store-runtime"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir()
        volumes = ["-v", f"{self.shared}:/var/practicus:rshared", "-v", f"{store}:/opt/lazyfs/store",
                   "-v", f"{self.work / 'model.json'}:/app/model.json:ro"]
        args = ["--config", "/app/model.json", "--store", "/opt/lazyfs/store", "--allow-other"]
        # 1. exactly the README's flags: downloads on first read, caches.
        first = f"{NAME}-runtime"
        self.podman.run_detached(first, "--network", "host", *MIN_CAPS, *volumes, *self.s3_env(),
                                 RUNTIME, *args)
        self.wait_ready(first)
        caps = self.podman("exec", first, "grep", "^CapEff", "/proc/1/status").stdout.split()[-1]
        self.results["runtime_capeff"] = caps
        self.read_in_second_container("runtime")
        first_gets = self.gets()
        check(first_gets > 0, "the first read downloaded nothing")
        self.wait_probe(first, ready=True, timeout=60)
        self.stop_cleanly(first)
        # 2. hardened: no-new-privileges, read-only root, only the store (and the
        #    shared folder) writable; a new file arrives meanwhile.
        self.add_file("extra.bin", os.urandom(3 * 1024 * 1024 + 5))
        hardened = f"{NAME}-hardened"
        self.proxy.clear()  # type: ignore[union-attr]
        self.podman.run_detached(hardened, "--network", "host", *MIN_CAPS,
                                 "--security-opt", "no-new-privileges", "--read-only",
                                 *volumes, *self.s3_env(), RUNTIME, *args)
        self.wait_ready(hardened)
        self.read_in_second_container("hardened")
        got = {r["key"].rsplit("/", 1)[-1] for r in self.proxy.requests("GET")}  # type: ignore[union-attr]
        check(got == {"extra.bin"}, f"after a restart only the new file should download; GETs for {got}")
        self.wait_probe(hardened, ready=True, timeout=60)
        # 3. podman restart (SIGTERM, start again): nothing downloads.
        self.proxy.clear()  # type: ignore[union-attr]
        self.podman("restart", "-t", "30", hardened, timeout=90)
        self.wait_ready(hardened, times=2)
        self.read_in_second_container("restarted")
        check(self.gets() == 0, f"the restarted container downloaded: {self.gets()} GETs")
        self.stop_cleanly(hardened)
        self.results["runtime"] = {"first_gets": first_gets, "gets_after_restart": 0}

    def wait_probe(self, name: str, ready: bool, timeout: float, command: list[str] | None = None) -> None:
        """The README's readiness probe, run in the lazyfs container."""
        probe = ["exec", name, *(command or ["lazyfs", "status", "--config", "/app/model.json", "--require-all"])]
        wait_for(lambda: (self.podman(*probe, check=False).returncode == 0) == ready, timeout,
                 f"the readiness probe in {name} to say {'ready' if ready else 'not ready'}")

    # -- (b) production ------------------------------------------------------------

    def production_scenario(self) -> None:
        assert self.proxy is not None
        key_id = "AKIA" + secrets.token_hex(8).upper()
        secret = "ct-" + secrets.token_urlsafe(30)
        creds = self.work / "secret" / "aws-credentials"
        creds.parent.mkdir(mode=0o700, exist_ok=True)
        creds.write_text(f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
        creds.chmod(0o600)
        self.lock_model(self.proxy.endpoint)
        # The model's largest file answers slowly once, so the bake outlasts its
        # 5-second progress interval and the build log shows a progress line.
        self.proxy.clear()
        self.proxy.add(Fault("delay", key=f"{FOLDER}/model.safetensors", seconds=7, times=1))
        log = self.work / "build-production.log"
        res = self.podman("build", "--target", "production", "--network", "host",
                          "--secret", f"id=aws,src={creds}",
                          "--build-arg", f"MODEL_JSON={(self.work / 'model.json').relative_to(REPO)}",
                          "--build-arg", f"MODEL_LOCK={(self.work / 'model.lock.json').relative_to(REPO)}",
                          "--build-arg", f"AWS_REGION={REGION}",
                          "--build-arg", f"AWS_ENDPOINT_URL={self.proxy.endpoint}",
                          "-t", PRODUCTION, str(REPO), timeout=600, check=False)
        log.write_text(res.stdout + res.stderr)
        check(res.returncode == 0, f"the production build failed (see {log}):\n{res.stdout[-3000:]}")
        self.proxy.clear_faults()
        n = len(self.model.files)
        progress = re.findall(r"lazyfs bake: \d+/\d+ files, .*", res.stdout)
        summary = re.findall(rf"lazyfs bake: {n} files: {n} downloaded.*", res.stdout)
        check(progress, f"no bake progress line in the build log ({log})")
        check(summary, f"no bake summary for {n} downloaded files in the build log ({log})")
        check(self.proxy.count("GET") > 0, "the bake sent no GET: was the layer cached?")
        self.results["production_build_log"] = progress[:2] + summary
        self.scan_for_secret(PRODUCTION, [key_id, secret])
        self.results["images"]["production"] = self.image_size(PRODUCTION)
        # A container from it, pinned by its lock (the image's CMD): every
        # file is there; not a single request, and the probe proves the lock.
        self.proxy.clear()
        name = f"{NAME}-production"
        self.podman.run_detached(name, "--network", "host", *MIN_CAPS,
                                 "-v", f"{self.shared}:/var/practicus:rshared", *self.s3_env(), PRODUCTION)
        self.wait_ready(name)
        check("ready PINNED" in self.podman.logs(name), "the production image did not start pinned")
        self.read_in_second_container("production")
        # A model server that is not root reads it too (the command's --allow-other).
        self.read_in_second_container("production-uid-1000", user="1000:1000")
        # The baked files sit in an image layer (overlayfs), the container has
        # only CAP_SYS_ADMIN: the kernel still reads them itself (passthrough).
        cache = json.loads(self.podman("exec", name, "cat", f"{MOUNT}/.lazyfs/stats.json").stdout)["cache"]
        self.results["production_passthrough_opens"] = cache["passthrough_opens"]
        if kernel_passes_through():
            check(cache["passthrough_opens"] >= len(self.model.files),
                  f"the production image's reads did not pass through: {cache}")
        self.wait_probe(name, ready=True, timeout=10, command=PINNED_PROBE)
        counts = {k: self.proxy.count(k) for k in ("LIST", "HEAD", "GET")}
        check(counts == {"LIST": 0, "HEAD": 0, "GET": 0}, f"the pinned production image sent requests: {counts}")
        self.results["production_requests"] = counts
        self.stop_cleanly(name)
        # With the object store unreachable: it starts offline from the baked
        # listing and still serves every file (no request can be sent at all).
        offline = f"{NAME}-offline"
        self.podman.run_detached(offline, "--network", "host", *MIN_CAPS,
                                 "-v", f"{self.shared}:/var/practicus:rshared",
                                 *self.s3_env(f"http://127.0.0.1:{free_port()}"), PRODUCTION,
                                 "--config", "/app/model.json",
                                 "--store", "/opt/lazyfs/store", "--allow-other")
        self.wait_ready(offline)
        check("ready OFFLINE" in self.podman.logs(offline), "the production image did not start offline")
        self.read_in_second_container("offline")
        self.stop_cleanly(offline)

    def scan_for_secret(self, image: str, needles: list[str]) -> None:
        """`podman save` every layer and grep it, and the history and config,
        for the credentials; and prove the scan sees content (model.json)."""
        archive = self.work / "production.tar"
        archive.unlink(missing_ok=True)
        self.podman("save", "--format", "docker-archive", "-o", str(archive), image, timeout=300)
        control = f"s3://{BUCKET}/{FOLDER}".encode()
        found_control = False
        blobs = 0
        try:
            with tarfile.open(archive) as outer:
                for member in outer:
                    if not member.isfile():
                        continue
                    data = outer.extractfile(member).read()  # type: ignore[union-attr]
                    blobs += 1
                    for needle in needles:
                        check(needle.encode() not in data, f"the secret is in {member.name} of the saved image")
                    found_control = found_control or control in data
        finally:
            archive.unlink(missing_ok=True)
        check(found_control, "the layer scan did not even find model.json: it proves nothing")
        meta = (self.podman("history", "--no-trunc", image).stdout
                + self.podman("image", "inspect", image).stdout)
        for needle in needles:
            check(needle not in meta, "the secret is in the image's history or config")
        ls = self.podman("run", "--rm", "--entrypoint", "sh", image, "-c",
                         "ls -A /root/.aws 2>/dev/null; true").stdout.strip()
        check(ls == "", f"/root/.aws in the image holds: {ls}")
        self.results["secret_scan"] = f"{blobs} blobs, history and config: no trace of the credentials"

    # -- (c) kube play ------------------------------------------------------------------

    def readme_pod(self) -> dict[str, Any]:
        text = (REPO / "README.md").read_text()
        section = text.split("### Kubernetes", 1)[1]
        block = re.search(r"```yaml\n(.*?)```", section, re.S)
        check(block, "no ```yaml pod spec in the README's Kubernetes section")
        pod = yaml.safe_load(block.group(1))  # type: ignore[union-attr]
        check(pod.get("kind") == "Pod", "the README's spec is not a Pod")
        dynamic = re.search(r"^\s*# args: (\[.*?\])\s+# dynamic mode$", block.group(1), re.M)  # type: ignore[union-attr]
        check(dynamic, "no commented `# args: [...]  # dynamic mode` line in the README's pod spec")
        pod["x-dynamic-args"] = json.loads(dynamic.group(1))  # type: ignore[union-attr]
        return pod

    def pod_for(self, mode: str) -> dict[str, Any]:
        """The README's pod, with what only this machine needs changed:
        images and credentials (a local S3 server, reached on the host
        network), the model server (a stand-in that sleeps), the dynamic mode's
        ConfigMap lines uncommented, and the practicus volume on a shared host
        folder (a podman emptyDir is not a shared mount: see the README)."""
        pod = copy.deepcopy(self.readme_pod())
        dynamic_args = pod.pop("x-dynamic-args")
        spec = pod["spec"]
        spec["hostNetwork"] = True
        spec["restartPolicy"] = "Never"
        lazy = next(c for c in spec["containers"] if c["name"] == "lazyfs")
        server = next(c for c in spec["containers"] if c["name"] == "model-server")
        lazy["image"] = RUNTIME if mode == "dynamic" else PRODUCTION
        lazy.setdefault("env", []).extend(
            {"name": k, "value": v} for k, v in (("AWS_ACCESS_KEY_ID", ACCESS_KEY),
                                                 ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
                                                 ("AWS_ENDPOINT_URL", self.proxy.endpoint)))  # type: ignore[union-attr]
        server["image"] = BASE_IMAGE
        server["command"] = ["python3", "-c", "import signal, sys; signal.signal(signal.SIGTERM, "
                             "lambda *a: sys.exit(0)); signal.pause()"]
        for v in spec["volumes"]:
            if v["name"] == "practicus":
                v.clear()
                v.update({"name": "practicus", "hostPath": {"path": str(self.shared), "type": "Directory"}})
        if mode == "prebaked":  # what lazyfs itself needs, in place of privileged: true
            lazy["securityContext"] = {"capabilities": {"add": ["SYS_ADMIN"]}}
            lazy["volumeMounts"].append({"name": "fuse", "mountPath": "/dev/fuse"})
            spec["volumes"].append({"name": "fuse", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}})
        if mode == "dynamic":  # prebaked: as written, no args (the image's own, pinned command)
            check("args" not in lazy, "the README's pod spec gives the prebaked mode args of its own")
            lazy["args"] = dynamic_args
            lazy["volumeMounts"].append({"name": "model-json", "mountPath": "/app"})
            spec["volumes"].append({"name": "model-json", "configMap": {"name": "my-model-json"}})
        return pod

    def kube_scenario(self, mode: str) -> None:
        assert self.proxy is not None
        pod = self.pod_for(mode)
        pod_file = self.work / f"pod-{mode}.yaml"
        pod_file.write_text(yaml.safe_dump(pod, sort_keys=False))
        args = [str(pod_file)]
        if mode == "dynamic":
            cm = self.work / "configmap.yaml"
            cm.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                                          "metadata": {"name": "my-model-json"},
                                          "data": {"model.json": (self.work / "model.json").read_text()}}))
            args = ["--configmap", str(cm), *args]
        self.proxy.clear()
        self.podman("kube", "play", *args, timeout=120)
        try:
            lazy, server = f"{POD}-lazyfs", f"{POD}-model-server"
            probe = next(c for c in pod["spec"]["containers"]
                         if c["name"] == "lazyfs")["readinessProbe"]["exec"]["command"]
            self.wait_ready(lazy)
            if mode == "dynamic":  # nothing on disk yet: the probe holds the pod back
                self.wait_probe(lazy, ready=False, timeout=10, command=probe)
            res = self.podman("exec", server, "sha256sum", *self.model.digests(), timeout=90)
            self.check_digests(res.stdout, f"kube play ({mode}): read in the model-server container")
            self.wait_probe(lazy, ready=True, timeout=60, command=probe)
            gets = self.gets()
            if mode == "prebaked":
                counts = {k: self.proxy.count(k) for k in ("LIST", "HEAD", "GET")}
                check(counts == {"LIST": 0, "HEAD": 0, "GET": 0}, f"the prebaked pod sent requests: {counts}")
                check("ready PINNED" in self.podman.logs(lazy), "the prebaked pod did not start pinned")
                self.wait_probe(lazy, ready=True, timeout=10, command=PINNED_PROBE)
                # The probe asks the mount: a daemon that stopped answering is not ready.
                self.podman("kill", "--signal", "STOP", lazy)
                try:
                    self.wait_probe(lazy, ready=False, timeout=60, command=probe)
                finally:
                    self.podman("kill", "--signal", "CONT", lazy)
                self.wait_probe(lazy, ready=True, timeout=60, command=probe)
            else:
                check(gets > 0, "the dynamic pod downloaded nothing")
            self.podman("pod", "stop", "-t", "30", POD, timeout=90)
            code = self.podman.exit_code(lazy)
            check(code == 0, f"lazyfs exited {code} on `podman pod stop`:\n{self.podman.logs(lazy)[-3000:]}")
            left = fuse_mounts_under(self.shared)
            check(not left, f"still mounted after the pod stopped: {left}")
            self.results.setdefault("kube", {})[mode] = {"gets": gets, "lazyfs_exit": code}
        finally:
            self.podman("kube", "down", str(pod_file), check=False, timeout=120)
            self.podman("pod", "rm", "-f", "-t", "10", POD, check=False, timeout=60)

    # -- the whole run ------------------------------------------------------------------

    def cleanup_leftovers(self) -> None:
        """Containers and the pod a previous, interrupted run of this script made."""
        names = self.podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split()
        for n in names:
            if n.startswith(NAME + "-"):
                self.podman("rm", "-f", "-t", "5", n, check=False, timeout=60)
        if self.podman("pod", "exists", POD, check=False).returncode == 0:
            labels = self.podman("pod", "inspect", "--format", "{{.Labels}}", POD, check=False).stdout
            say(f"a pod named {POD} exists ({labels.strip()}); removing it (this script's, from an earlier run)")
            self.podman("pod", "rm", "-f", "-t", "5", POD, check=False, timeout=60)
        for m in sorted(fuse_mounts_under(self.work), reverse=True):
            force_unmount(m)
        if any(line.split()[1] == str(self.shared) for line in open("/proc/self/mounts")):
            subprocess.run(["umount", "-l", str(self.shared)], capture_output=True, timeout=30)

    def main(self) -> int:
        started = time.monotonic()
        self.podman.log_path.write_text("")
        self.cleanup_leftovers()
        self.timed("build runtime image", self.build_runtime)
        with MotoServer(log_path=self.work / "moto.log") as moto, S3Proxy(moto.endpoint) as proxy, \
                SharedFolder(self.shared):
            self.proxy = proxy
            try:
                self.upload_model(moto.endpoint)
                self.timed("(a) runtime image: second container, restart", self.runtime_scenario)
                self.timed("(b) production image: build secret, no GET", self.production_scenario)
                self.timed("(c) kube play, dynamic mode", lambda: self.kube_scenario("dynamic"))
                self.timed("(c) kube play, prebaked mode", lambda: self.kube_scenario("prebaked"))
            finally:
                self.podman.remove_all()
        self.results["total_seconds"] = round(time.monotonic() - started, 1)
        (self.work / "result.json").write_text(json.dumps(self.results, indent=2))
        images = self.results["images"]
        say("images: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in images.items())
            + f" (lazyfs adds {(images['runtime'] - images['base']) / 1e6:.0f} MB to the base)")
        say(f"passed in {self.results['total_seconds']} s; details in {self.work / 'result.json'}")
        return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="the work folder (.container-test)")
    args = p.parse_args()
    # A stop (CI's timeout, a kill of the job) runs the clean-ups below and
    # the servers' context managers: Python's default SIGTERM skips them and
    # left the S3 server and a container running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.work.mkdir(parents=True, exist_ok=True)
    run = Run(args.work.resolve())
    try:
        return run.main()
    except Failed as e:
        say(f"FAILED: {e}")
        say(f"podman calls and their output: {run.podman.log_path}")
        return 1
    finally:
        run.cleanup_leftovers()


if __name__ == "__main__":
    sys.exit(main())
