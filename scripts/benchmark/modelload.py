"""The model-load scenario (`--scenarios model`): a sharded safetensors
checkpoint (benchmark.checkpoint) loaded into CPU memory by each contender, as
a model server loads its weights, every tensor materialised and checked.

Contenders, each in a fresh process (benchmark.loader), after `drop_caches`
and with the server's copy of the checkpoint read back into the page cache (the
server is never disk-bound; everything on the client side starts cold):

    local              load_file from the local copy of the checkpoint (the disk)
    lazyfs             load_file from a fresh lazyfs mount, empty store
    lazyfs-restart     the same store, complete, mounted again
    lazyfs-restart-warm  again, with the store's shards read into the page cache first: the FUSE
                       path alone, without the store's disk
    runai-restart      the Run:ai streamer right after it: it keeps nothing, it streams again
    lazyfs-prefetch    load_file from a fresh mount with --prefetch
    local-pt, lazyfs-pt, lazyfs-pt-restart
                       the same three with vLLM's default loader instead of load_file: `safe_open`,
                       then `get_tensor` one tensor at a time, so the first tensor comes before the
                       whole shard (load_file returns a shard's tensors only once all are read)
    local-rs, lazyfs-rs, lazyfs-rs-restart
                       the same three with the Run:ai streamer reading the files (vLLM's
                       `--load-format runai_streamer` given a local folder)
    boto3              download_file of every file, then load_file
    runai, runai-16    the Run:ai Model Streamer, default concurrency and 16 object-store clients
    s3torch            s3torchconnector's S3Client, each file read into memory, safetensors.torch.load

A loader starts its clock once torch is imported and the destination tensors
are allocated.  For lazyfs the loader then waits, the harness mounts, and the
clock starts when the mount is ready: the time to all tensors is reported both
from the loader's start and including the mount (what a user waits for).  The
CPU seconds of the loader, the lazyfs daemon and the S3 server are those spent
while the clock ran (and, for lazyfs, during the mount).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from benchmark.checkpoint import FOLDER, Checkpoint
from benchmark.mounts import LazyfsMounter, Mounted, Mounter, lazyfs_prefetch_args, proc_sample
from benchmark.scenarios import Ctx

MiB = 1 << 20
PREFIX = "model:"  # results of this scenario are kept under system "model:<contender>"
CONTENDERS = ("local", "lazyfs", "lazyfs-prefetch", "boto3", "runai", "runai-16", "s3torch", "lazyfs-restart",
              "lazyfs-restart-warm", "runai-restart", "local-pt", "lazyfs-pt", "lazyfs-pt-restart", "local-rs",
              "lazyfs-rs", "lazyfs-rs-restart")
# --only names (main.SYSTEMS) -> the contenders they enable.
BY_SYSTEM = {"local": ("local", "local-pt", "local-rs"),
             "lazyfs": ("lazyfs", "lazyfs-prefetch", "lazyfs-restart", "lazyfs-restart-warm", "lazyfs-pt",
                        "lazyfs-pt-restart", "lazyfs-rs", "lazyfs-rs-restart"),
             "boto3": ("boto3",),
             "runai": ("runai", "runai-16", "runai-restart"), "s3torch": ("s3torch",)}
LABELS = {
    "local": "`load_file` from a local copy, page cache dropped",
    "lazyfs": "lazyfs, `load_file` from the mount, empty store",
    "lazyfs-prefetch": "lazyfs with `--prefetch`, empty store",
    "boto3": "boto3 `download_file` of every file, then `load_file`",
    "runai": "Run:ai streamer, default concurrency (8)",
    "runai-16": "Run:ai streamer, 16 object-store clients",
    "s3torch": "s3torchconnector `S3Client`, read whole, `safetensors.torch.load`",
    "lazyfs-restart": "restart: lazyfs mounted again over its full store",
    "lazyfs-restart-warm": "restart, the store's files already in the page cache (the FUSE path alone)",
    "runai-restart": "restart: Run:ai streamer again (default; keeps nothing)",
    "local-pt": "vLLM's loader (`safe_open`, tensor by tensor) from a local copy, page cache dropped",
    "lazyfs-pt": "lazyfs, vLLM's loader from the mount, empty store",
    "lazyfs-pt-restart": "restart: lazyfs again over its full store, vLLM's loader",
    "local-rs": "the Run:ai streamer reading a local copy (vLLM's runai_streamer on a folder), page cache dropped",
    "lazyfs-rs": "lazyfs, the Run:ai streamer reading the mount, empty store",
    "lazyfs-rs-restart": "restart: lazyfs again over its full store, the Run:ai streamer reading it",
}
PER_TENSOR = ["--per-tensor"]
STREAMER = ["--streamer"]
GO_TIMEOUT_S = 300.0


@dataclass
class Run:
    out: dict[str, Any]
    wall_s: float | None
    error: str = ""


def selected(systems: Sequence[str]) -> list[str]:
    on = {c for s in systems for c in BY_SYSTEM.get(s, ())}
    return [c for c in CONTENDERS if c in on]


def runai_env(ep_url: str, concurrency: int | None) -> dict[str, str]:
    """What vLLM's docs set for an S3-compatible store (endpoint, path-style
    addressing, no instance metadata), plus the concurrency when given."""
    env = {"AWS_ENDPOINT_URL": ep_url, "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
           "AWS_EC2_METADATA_DISABLED": "true"}
    if concurrency:
        env["RUNAI_STREAMER_CONCURRENCY"] = str(concurrency)
    return env


class Model:
    def __init__(self, ctx: Ctx, ck: Checkpoint, lazyfs: Mounter | None) -> None:
        self.ctx = ctx
        self.ck = ck
        self.lazyfs = lazyfs
        self.prefix = f"{ck.profile.name}/{FOLDER}"

    # -- plumbing ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything on the client side cold; the server's copy in the page cache."""
        self.ctx.drop_caches()
        srv = self.ctx.server
        if srv is not None:
            self.ctx.warm(p for p in (srv.store_dir / self.ctx.ep.bucket / self.prefix).rglob("*") if p.is_file())

    def loader(self, argv: list[str], env: dict[str, str] | None = None, mount: Any = None) -> tuple[Run, Any]:
        """Run one loader.  With `mount` (a callable returning a Mounted), the
        loader waits after its set-up, the mount is made, then it goes."""
        ctx = self.ctx
        go = ctx.workdir / f"go-{time.monotonic_ns()}"
        err = ctx.workdir / "loader.err"
        out = ctx.workdir / "loader.out"
        args = [sys.executable, "-m", "benchmark.loader", *argv, "--ref", str(self.ck.reference)]
        if mount is not None:
            args += ["--go", str(go)]
        with open(err, "wb") as e, open(out, "wb") as o:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                    env=ctx.ep.env(env), start_new_session=True)
        deadline = time.monotonic() + ctx.op_timeout
        mt = None
        try:
            if mount is not None:
                ready = go.with_name(go.name + ".ready")
                while not ready.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the loader did not get ready: {_tail(err)}")
                    time.sleep(0.01)
                mt = mount()
                go.touch()
            t0 = time.monotonic()
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return Run({}, None, f"timed out after {ctx.op_timeout:g} s"), mt
            wall = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        try:
            res = json.loads(out.read_text().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            return Run({}, wall, f"exit {proc.returncode}, no result: {_tail(err)}"), mt
        error = "" if res.get("ok") else (res.get("error") or f"tensors differ from the source: {res.get('bad')}")
        return Run(res, wall, error), mt

    def measure(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                mount: Any = None, warm: Sequence[Path] = ()) -> Mounted | None:
        """Prepare (and read `warm` into the page cache), run, record; returns
        the live mount (the caller unmounts it)."""
        ctx, system = self.ctx, PREFIX + name
        self.prepare()
        ctx.warm(warm)
        srv_pid = ctx.server.pid if ctx.server else None
        before, srv0 = ctx.traffic(), proc_sample(srv_pid).cpu_s if srv_pid else None
        run, mt = self.loader(argv, env, mount)
        tr = ctx.since(before)
        srv1 = proc_sample(srv_pid).cpu_s if srv_pid else None
        if run.error:
            ctx.problem(system, f"load failed: {run.error}")
            ctx.put(system, "verify.ok", False)
            return mt
        r = run.out
        ctx.put(system, "verify.ok", bool(r.get("ok")))
        ctx.put(system, "model.all_s", r["all_s"])
        ctx.put(system, "model.first_s", r["first_s"])
        mount_s = mt.record.mount_s if mt is not None else 0.0
        ctx.put(system, "model.total_s", r["all_s"] + mount_s)
        ctx.put(system, "model.first_total_s", (r["first_s"] or 0.0) + mount_s)
        if mt is not None:
            ctx.put(system, "model.mount_s", mount_s)
            served = self.served_bytes(mt)
            ctx.put(system, "model.served_ratio", served / self.ck.total_bytes if served is not None else None)
            s = mt.sample()  # a mount made for this load: its start-up and the load
            ctx.put(system, "model.cpu_daemon_s", s.cpu_s)
            ctx.put(system, "model.rss_daemon_mib", s.vmhwm_kib / 1024 if s.vmhwm_kib else None)
        ctx.put(system, "model.cpu_loader_s", r["cpu_s"])
        ctx.put(system, "model.rss_loader_mib", (r.get("vmhwm_kib") or 0) / 1024 or None)
        if srv0 is not None and srv1 is not None:
            ctx.put(system, "model.cpu_server_s", srv1 - srv0)
        if tr is not None:
            ctx.put(system, "model.srv_ratio", tr.bytes() / self.ck.total_bytes)
            ctx.put(system, "model.requests", tr.summary())
        ctx.log(f"    {name}: {r['all_s']:.2f} s to all tensors (+{mount_s:.2f} s mount), first after "
                f"{r['first_s'] or 0:.2f} s, {'ok' if r.get('ok') else 'CHECK FAILED'}")
        return mt

    def served_bytes(self, mt: Mounted) -> int | None:
        """Bytes lazyfs answered FUSE reads with (its stats file, read by a
        child under a timeout: never the harness itself on a FUSE path)."""
        path = mt.spec.mnt / ".lazyfs" / "stats.json"
        try:
            res = subprocess.run(["cat", str(path)], capture_output=True, timeout=30, check=False)
            return sum(int(v) for v in json.loads(res.stdout)["cache"]["served_bytes"].values())
        except (OSError, ValueError, KeyError, TypeError, subprocess.TimeoutExpired):
            return None

    def wait_published(self, store: Path, timeout: float = 300.0) -> bool:
        deadline = time.monotonic() + timeout
        for name, (size, _) in self.ck.files.items():
            path = store / self.ck.key(name)
            while True:
                try:
                    if path.stat().st_size == size:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
        return True

    # -- the contenders -----------------------------------------------------------------------------

    def local(self, name: str = "local", how: Sequence[str] = ()) -> None:
        self.measure(name, ["files", str(self.ck.root), *how])

    def lazyfs_cold_and_restart(self, with_restart: bool, with_warm: bool, with_runai: bool,
                                name: str = "lazyfs", how: Sequence[str] = ()) -> None:
        ctx, m = self.ctx, self.lazyfs
        assert m is not None
        tag = "model" + name.removeprefix("lazyfs")  # the daemon's log: logs/lazyfs-model-cold-r0.log
        store = ctx.fresh(tag + "-lazyfs")
        folder = self._mount_folder()
        mt = self.measure(name, ["files", folder, *how], mount=lambda: ctx.mount(m, FOLDER, store, tag + "-cold"))
        if mt is None:
            return
        if (with_restart or with_warm) and not self.wait_published(store):
            ctx.problem(PREFIX + name, "the checkpoint was not complete in the store after 300 s")
        ctx.unmount(mt)
        if with_restart:
            mt = self.measure(name + "-restart", ["files", folder, *how],
                              mount=lambda: ctx.mount(m, FOLDER, store, tag + "-restart"))
            if mt is not None:
                ctx.unmount(mt)
        if with_warm:
            mt = self.measure("lazyfs-restart-warm", ["files", folder],
                              mount=lambda: ctx.mount(m, FOLDER, store, "model-restart-warm"),
                              warm=[store / self.ck.key(s) for s in self.ck.shards])
            if mt is not None:
                ctx.unmount(mt)
        if with_runai:
            self.runai("runai-restart", None)

    def lazyfs_prefetch(self) -> None:
        ctx, m = self.ctx, self.lazyfs
        assert m is not None
        args = lazyfs_prefetch_args()
        if args is None:
            ctx.problem(PREFIX + "lazyfs-prefetch", "this lazyfs has no --prefetch")
            return
        store = ctx.fresh("model-prefetch")
        mt = self.measure("lazyfs-prefetch", ["files", self._mount_folder()],
                          mount=lambda: ctx.mount(m, FOLDER, store, "model-prefetch", args))
        if mt is not None:
            ctx.unmount(mt)

    def _mount_folder(self) -> str:
        """Where lazyfs shows the checkpoint (it keeps key paths)."""
        return str(self.ctx.workdir / "mnt" / "lazyfs" / self.prefix)

    def _dest(self, name: str) -> str:
        d = self.ctx.workdir / "downloads" / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return str(d)

    def boto3(self) -> None:
        ep = self.ctx.ep
        self.measure("boto3", ["boto3", "--endpoint", ep.url, "--bucket", ep.bucket, "--prefix", self.prefix,
                               "--dest", self._dest("boto3")])
        shutil.rmtree(self.ctx.workdir / "downloads", ignore_errors=True)

    def runai(self, name: str, concurrency: int | None) -> None:
        ep = self.ctx.ep
        self.measure(name, ["runai", "--bucket", ep.bucket, "--prefix", self.prefix, "--dest", self._dest(name)],
                     env=runai_env(ep.url, concurrency))
        shutil.rmtree(self.ctx.workdir / "downloads", ignore_errors=True)

    def s3torch(self) -> None:
        ep = self.ctx.ep
        self.measure("s3torch", ["s3torch", "--endpoint", ep.url, "--region", ep.region, "--bucket", ep.bucket,
                                 "--prefix", self.prefix])


def run_model(ctx: Ctx, ck: Checkpoint, systems: Sequence[str], lazyfs: LazyfsMounter | None) -> None:
    """Every selected contender once (one repetition)."""
    want = selected(systems)
    md = Model(ctx, ck, lazyfs)
    plan: list[tuple[str, Any]] = []
    if "local" in want:
        plan.append(("local", md.local))
    if lazyfs is not None and "lazyfs" in want:
        plan.append(("lazyfs", lambda: md.lazyfs_cold_and_restart(
            "lazyfs-restart" in want, "lazyfs-restart-warm" in want, "runai-restart" in want)))
    if lazyfs is not None and "lazyfs-prefetch" in want:
        plan.append(("lazyfs-prefetch", md.lazyfs_prefetch))
    if "boto3" in want:
        plan.append(("boto3", md.boto3))
    if "runai" in want:
        plan.append(("runai", lambda: md.runai("runai", None)))
        plan.append(("runai-16", lambda: md.runai("runai-16", 16)))
    if "s3torch" in want:
        plan.append(("s3torch", md.s3torch))
    if "local-pt" in want:
        plan.append(("local-pt", lambda: md.local("local-pt", PER_TENSOR)))
    if lazyfs is not None and "lazyfs-pt" in want:
        plan.append(("lazyfs-pt", lambda: md.lazyfs_cold_and_restart(
            "lazyfs-pt-restart" in want, False, False, "lazyfs-pt", PER_TENSOR)))
    if "local-rs" in want:
        plan.append(("local-rs", lambda: md.local("local-rs", STREAMER)))
    if lazyfs is not None and "lazyfs-rs" in want:
        plan.append(("lazyfs-rs", lambda: md.lazyfs_cold_and_restart(
            "lazyfs-rs-restart" in want, False, False, "lazyfs-rs", STREAMER)))
    for name, fn in plan:
        ctx.log(f"  model load: {name}")
        ctx.guard(PREFIX + name, "model", fn)


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace").strip()
    except OSError:
        return ""
