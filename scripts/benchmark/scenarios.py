"""The benchmark's scenarios, for each kind of system measured.

Every scenario on a network filesystem starts from a fresh, empty store or
cache (the remount and cached-mmap cases reuse the store of the scenario they
follow).  The server's store stays in the page cache throughout, so the server
is never disk-bound.  The kernel page cache is dropped (`drop_caches`) only for
the plain local file's first pass, after which the server store and the local
copy are read back in.  Pass-through and remount first passes read a source
that is in the page cache: they measure the FUSE path, not the disk.

Every measured access runs in a child process (cat, bash, or benchprobe) under
a timeout, so a hung filesystem fails one measurement instead of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from benchmark.data import Dataset
from benchmark.mounts import (
    LazyfsMounter,
    Mounted,
    Mounter,
    MountRecord,
    MountSpec,
    PassthroughMounter,
    lazyfs_prefetch_args,
)
from benchmark.server import Endpoint, LocalS3, Traffic

MiB = 1 << 20
GiB = 1 << 30
# "model" is benchmark.modelload's (it needs the bench extra: torch and the model loaders).
SCENARIOS = ("seq", "prefetch", "ttfb", "mmap", "readers", "shards", "meta", "model")
SLICES, SLICE_BYTES, SEED = 64, MiB, 1


@dataclass
class Op:
    wall_s: float | None
    ok: bool
    error: str = ""
    stdout: str = ""


@dataclass
class Results:
    """values[system][metric][repetition]: one value each (checks are and-ed)."""

    values: dict[str, dict[str, dict[int, Any]]] = field(default_factory=dict)
    mounts: list[MountRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def put(self, system: str, metric: str, value: Any, rep: int) -> None:
        if value is None:
            return
        slot = self.values.setdefault(system, {}).setdefault(metric, {})
        old = slot.get(rep)
        slot[rep] = (old and value) if isinstance(old, bool) and isinstance(value, bool) else value


@dataclass
class Ctx:
    ep: Endpoint
    server: LocalS3 | None  # None: a remote endpoint, no counters
    ds: Dataset
    workdir: Path
    results: Results
    log: Callable[[str], None]
    on_pid: Callable[[int, bool], None]  # (pid, alive): lets the run clean up after a crash
    op_timeout: float = 600.0
    mount_timeout: float = 60.0
    rep: int = 0
    live: list[Mounted] = field(default_factory=list)

    # -- plumbing ---------------------------------------------------------------

    def put(self, system: str, metric: str, value: Any) -> None:
        self.results.put(system, metric, value, self.rep)

    def problem(self, system: str, what: str) -> None:
        line = f"{system}: {' '.join(what.split())}"
        self.results.problems.append(line)
        self.log(f"  PROBLEM {line[:300]}")

    def traffic(self) -> Traffic | None:
        return self.server.traffic() if self.server else None

    def since(self, before: Traffic | None) -> Traffic | None:
        now = self.traffic()
        return now.minus(before) if now is not None and before is not None else None

    def fresh(self, name: str) -> Path:
        d = self.workdir / "stores" / f"{name}-r{self.rep}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def mount(self, m: Mounter, folder: str, store: Path, tag: str, extra: Iterable[str] = ()) -> Mounted:
        mnt = self.workdir / "mnt" / m.name
        mnt.mkdir(parents=True, exist_ok=True)
        private = self.workdir / "private"
        private.mkdir(mode=0o700, exist_ok=True)
        spec = MountSpec(folder, mnt, store, f"{tag}-r{self.rep}",
                         self.workdir / "logs" / f"{m.name}-{tag}-r{self.rep}.log", private, list(extra))
        mt = m.mount(spec, self.ep, self.ds, self.mount_timeout)
        self.live.append(mt)
        self.on_pid(mt.pid, True)
        return mt

    def unmount(self, mt: Mounted) -> MountRecord:
        rec = mt.stop()
        self.on_pid(mt.pid, False)
        if mt in self.live:
            self.live.remove(mt)
            self.results.mounts.append(rec)
            for p in rec.problems:
                self.problem(mt.system, f"[{rec.tag}] {p}")
        return rec

    def run(self, argvs: list[list[str]], capture: bool = False) -> Op:
        """Start all at once; wall time until the last one ends."""
        errs = [self.workdir / f"op{i}.err" for i in range(len(argvs))]
        out = self.workdir / "op.out"
        t0 = time.perf_counter()
        procs = []
        for argv, err in zip(argvs, errs, strict=False):
            with open(err, "wb") as e, open(out if capture else os.devnull, "wb") as o:
                procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                              env=self.ep.env(), start_new_session=True))
        deadline = t0 + self.op_timeout
        timed_out = False
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        wall = time.perf_counter() - t0
        if timed_out:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            return Op(None, False, f"timed out after {self.op_timeout:g} s")
        bad = [(p.returncode, err.read_text(errors="replace").strip()[-300:])
               for p, err in zip(procs, errs, strict=False)
               if p.returncode != 0]
        text = out.read_text(errors="replace") if capture else ""
        return Op(wall, not bad, "; ".join(f"exit {rc}: {msg}" for rc, msg in bad[:2]), text)

    def cat(self, paths: list[str]) -> Op:
        return self.run([["cat", p] for p in paths])

    def probe(self, *args: str) -> dict[str, Any]:
        op = self.run([[sys.executable, "-m", "benchmark.probe", *args]], capture=True)
        if not op.ok:
            return {"error": op.error}
        try:
            return json.loads(op.stdout)
        except ValueError:
            return {"error": f"probe printed no result: {op.stdout[-200:]}"}

    def verify(self, system: str, paths: list[tuple[str, str]], samples: int = 14) -> bool:
        """Sampled SHA-256 of (mounted path, dataset rel) pairs against the local copy."""
        ok = True
        for path, rel in paths:
            r = self.probe("verify", path, "--ref", str(self.ds.local(rel)), "--samples", str(samples))
            if not r.get("ok"):
                ok = False
                self.problem(system, f"data check of {rel} failed: {r.get('why') or r.get('error')}")
        self.put(system, "verify.ok", ok)
        return ok

    def drop_caches(self) -> None:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def warm(self, paths: Iterable[Path]) -> int:
        """Read files into the page cache (local files only, never a mount)."""
        n = 0
        buf = bytearray(8 * MiB)
        for p in paths:
            try:
                with open(p, "rb", buffering=0) as f:
                    while k := f.readinto(buf):
                        n += k
            except OSError:
                pass
        return n

    def warm_server(self) -> None:
        if self.server:
            self.warm(p for p in (self.server.store_dir / self.ep.bucket / self.ds.profile.name).rglob("*")
                      if p.is_file())

    def wait_published(self, store: Path, rel: str, timeout: float = 300.0) -> float | None:
        """Seconds until lazyfs has published `rel` into `store` (renamed into place)."""
        t0 = time.monotonic()
        path = store / self.ds.key(rel)
        while time.monotonic() - t0 < timeout:
            try:
                if path.stat().st_size == self.ds.size(rel):
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.02)
        return None

    def guard(self, system: str, name: str, fn: Callable[[], None]) -> None:
        """Run one scenario; a failure is a problem of that scenario only."""
        try:
            fn()
        except Exception as e:  # the next scenario still runs
            self.problem(system, f"{name}: {type(e).__name__}: {str(e)[:1500]}")
        finally:
            for mt in list(self.live):
                self.unmount(mt)
            shutil.rmtree(self.workdir / "stores", ignore_errors=True)


def mbps(nbytes: int, op: Op) -> float | None:
    return nbytes / 1e6 / op.wall_s if op.ok and op.wall_s else None


def key_mib(tr: Traffic | None, key: str) -> float | None:
    return tr.key_bytes(key) / MiB if tr is not None else None


# -- network filesystems and the pass-through -----------------------------------------


def run_mounted(ctx: Ctx, m: Mounter, scenarios: set[str]) -> None:
    plan: list[tuple[str, Callable[[Ctx, Mounter], None]]] = [
        ("seq", seq), ("prefetch", prefetch), ("ttfb", ttfb), ("mmap", mmap_reads), ("readers", readers),
        ("shards", shards), ("meta", meta)]
    for name, fn in plan:
        if name in scenarios and applies(m, name):
            ctx.log(f"  {m.name}: {name}")
            ctx.guard(m.name, name, lambda fn=fn: fn(ctx, m))


def applies(m: Mounter, scenario: str) -> bool:
    if scenario == "prefetch":
        return isinstance(m, LazyfsMounter)
    if scenario == "readers":
        return not isinstance(m, PassthroughMounter)
    return True


def seq(ctx: Ctx, m: Mounter) -> None:
    """Cold read, warm re-read in the same mount, first read after a remount."""
    ds, rel, name = ctx.ds, ctx.ds.big, m.name
    size, key = ds.size(rel), ds.key(rel)
    lazy = isinstance(m, LazyfsMounter)
    store = ctx.fresh(f"{name}-seq")
    mt = ctx.mount(m, "models", store, "seq")
    before, cpu0 = ctx.traffic(), mt.sample().cpu_s
    op = ctx.cat([mt.path(rel)])
    cpu1, tr = mt.sample().cpu_s, ctx.since(before)
    if not op.ok:
        ctx.problem(name, f"cold read failed: {op.error}")
    ctx.put(name, "seq.cold_s", op.wall_s if op.ok else None)
    ctx.put(name, "seq.cold_mbps", mbps(size, op))
    if not isinstance(m, PassthroughMounter):
        ctx.put(name, "seq.cold_srv_mib", key_mib(tr, key))
        ctx.put(name, "seq.cold_requests", tr.summary() if tr else None)
    if cpu0 is not None and cpu1 is not None:
        ctx.put(name, "seq.cpu_per_gib", (cpu1 - cpu0) / (size / GiB))
    if lazy:
        # Measure the warm path on the published file, not during its check.
        ctx.put(name, "seq.publish_s", ctx.wait_published(store, rel))
    op = ctx.cat([mt.path(rel)])
    ctx.put(name, "seq.warm_mbps", mbps(size, op))
    ctx.verify(name, [(mt.path(rel), rel)])
    rec = ctx.unmount(mt)
    ctx.put(name, "res.peak_rss_seq_mib", rec.peak_rss_mib)
    if lazy:
        ctx.warm([store / key])  # the store copy in the page cache, like the pass-through's source
    mt = ctx.mount(m, "models", store, "remount")
    before = ctx.traffic()
    op = ctx.cat([mt.path(rel)])
    tr = ctx.since(before)
    ctx.put(name, "seq.remount_mbps", mbps(size, op))
    if not isinstance(m, PassthroughMounter) and tr is not None:
        ctx.put(name, "seq.remount_srv_mib", tr.bytes() / MiB)
    ctx.unmount(mt)


def prefetch(ctx: Ctx, m: Mounter) -> None:
    args = lazyfs_prefetch_args()
    if args is None:
        ctx.put(m.name, "prefetch.mbps", "n/a (no --prefetch)")
        return
    rel = ctx.ds.big
    mt = ctx.mount(m, "models", ctx.fresh("prefetch"), "prefetch", args)
    op = ctx.cat([mt.path(rel)])  # at once: a model server starts reading as soon as it is mounted
    ctx.put(m.name, "prefetch.mbps", mbps(ctx.ds.size(rel), op) if op.ok else f"failed: {op.error[:80]}")
    ctx.verify(m.name, [(mt.path(rel), rel)])


def ttfb(ctx: Ctx, m: Mounter) -> None:
    rel = ctx.ds.big
    mt = ctx.mount(m, "models", ctx.fresh(f"{m.name}-ttfb"), "ttfb")
    before = ctx.traffic()
    r = ctx.probe("ttfb", mt.path(rel), "--ref", str(ctx.ds.local(rel)))
    tr = ctx.since(before)
    if "error" in r or not r.get("ok"):
        ctx.problem(m.name, f"first 4 KiB: {r.get('error') or 'wrong bytes'}")
        ctx.put(m.name, "verify.ok", False)
        return
    for k in ("total_ms", "open_ms", "read_ms"):
        ctx.put(m.name, f"ttfb.{k}", r[k])
    if tr is not None and not isinstance(m, PassthroughMounter):
        ctx.put(m.name, "ttfb.requests", tr.summary())


def mmap_reads(ctx: Ctx, m: Mounter) -> None:
    """Random slices through mmap: of an uncached file, then of a cached one."""
    rel, lazy = ctx.ds.shards[0], isinstance(m, LazyfsMounter)
    size, key = ctx.ds.size(rel), ctx.ds.key(rel)
    args = ["--ref", str(ctx.ds.local(rel)), "--slices", str(SLICES), "--slice-bytes", str(SLICE_BYTES),
            "--seed", str(SEED)]
    store = ctx.fresh(f"{m.name}-mmap")
    if not isinstance(m, PassthroughMounter):
        mt = ctx.mount(m, "models", store, "mmap")
        before = ctx.traffic()
        r = ctx.probe("mmap", mt.path(rel), *args)
        tr = ctx.since(before)
        if not _mmap_ok(ctx, m.name, r):
            return
        ctx.put(m.name, "mmap.cold_s", r["total_s"])
        ctx.put(m.name, "mmap.first_slice_ms", r["first_slice_ms"])
        ctx.put(m.name, "mmap.srv_mib", key_mib(tr, key))
        if not lazy:
            return  # the peers' "cached" state is a patchwork of ranges: not comparable
        ctx.put(m.name, "mmap.publish_s", ctx.wait_published(store, rel))
        tr = ctx.since(before)
        ctx.put(m.name, "mmap.dl_ratio", tr.key_bytes(key) / size if tr else None)
        ctx.unmount(mt)
        ctx.warm([store / key])
    mt = ctx.mount(m, "models", store, "mmap-cached")
    r = ctx.probe("mmap", mt.path(rel), *args)
    if _mmap_ok(ctx, m.name, r):
        ctx.put(m.name, "mmap.cached_s", r["total_s"])


def _mmap_ok(ctx: Ctx, system: str, r: dict[str, Any]) -> bool:
    ok = "error" not in r and bool(r.get("ok"))
    if not ok:
        ctx.problem(system, f"mmap reads: {r.get('error') or 'wrong bytes'}")
    ctx.put(system, "verify.ok", ok)
    return ok


def readers(ctx: Ctx, m: Mounter) -> None:
    rel = ctx.ds.big
    mt = ctx.mount(m, "models", ctx.fresh(f"{m.name}-readers"), "readers")
    before = ctx.traffic()
    op = ctx.cat([mt.path(rel)] * 4)
    tr = ctx.since(before)
    if not op.ok:
        ctx.problem(m.name, f"4 readers: {op.error}")
        return
    ctx.put(m.name, "readers.wall_s", op.wall_s)
    if tr is not None:
        ctx.put(m.name, "readers.dl_ratio", tr.key_bytes(ctx.ds.key(rel)) / ctx.ds.size(rel))
    ctx.verify(m.name, [(mt.path(rel), rel)], samples=6)


def shards(ctx: Ctx, m: Mounter) -> None:
    rels = ctx.ds.shards
    mt = ctx.mount(m, "models", ctx.fresh(f"{m.name}-shards"), "shards")
    op = ctx.cat([mt.path(r) for r in rels])
    if not op.ok:
        ctx.problem(m.name, f"4 shards: {op.error}")
        return
    ctx.put(m.name, "shards.agg_mbps", mbps(sum(ctx.ds.size(r) for r in rels), op))
    ctx.verify(m.name, [(mt.path(r), r) for r in rels], samples=4)


META_CMDS = {
    "find": 'find "$1" -type f | wc -l',
    "lsR": 'ls -lR "$1" > /dev/null',
    "du": 'du -sb "$1"',
}


def meta(ctx: Ctx, m: Mounter) -> None:
    """find, ls -lR and du over the small files, each on a fresh mount."""
    requests: list[int | None] = []
    for op_name, script in META_CMDS.items():
        mt = ctx.mount(m, "many", ctx.fresh(f"{m.name}-{op_name}"), op_name)
        top = str(Path(mt.path("many/x")).parent)
        run_meta(ctx, m.name, op_name, top, script, requests)
        if op_name == "lsR":
            op = ctx.run([["bash", "-c", script, "_", top]])
            ctx.put(m.name, "meta.lsR_warm_s", op.wall_s if op.ok else None)
        if op_name == "du":
            check_small_files(ctx, m.name, mt)
        ctx.unmount(mt)
    if all(r is not None for r in requests):
        ctx.put(m.name, "meta.requests", " / ".join(str(r) for r in requests))


def run_meta(ctx: Ctx, system: str, op_name: str, top: str, script: str, requests: list[int | None]) -> None:
    before = ctx.traffic()
    op = ctx.run([["bash", "-c", script, "_", top]], capture=True)
    tr = ctx.since(before)
    requests.append(tr.requests() if tr is not None and system != "passthrough" else None)
    if not op.ok:
        ctx.problem(system, f"{op_name}: {op.error}")
        return
    ctx.put(system, f"meta.{op_name}_s", op.wall_s)
    files = ctx.ds.small
    if op_name == "find" and op.stdout.strip() != str(len(files)):
        ctx.problem(system, f"find counted {op.stdout.strip()} files, expected {len(files)}")
        ctx.put(system, "verify.ok", False)
    if op_name == "du":
        total = sum(ctx.ds.size(r) for r in files)
        got = int(op.stdout.split()[0]) if op.stdout[:1].isdigit() else -1
        # Folders may add their own sizes (a local folder is 4 KiB), never less.
        if not total <= got <= total + 4096 * (ctx.ds.profile.small_dirs + 1):
            ctx.problem(system, f"du -sb says {got} bytes, the files hold {total}")
            ctx.put(system, "verify.ok", False)


def check_small_files(ctx: Ctx, system: str, mt: Mounted) -> None:
    """Whole-file SHA-256 of a spread of small files read through the mount."""
    picks = ctx.ds.small[:: max(1, len(ctx.ds.small) // 20)]
    listing = ctx.workdir / "hashes.txt"
    listing.write_text("".join(f"{mt.path(rel)} {ctx.ds.files[rel][1]}\n" for rel in picks))
    r = ctx.probe("hashes", str(listing))
    if not r.get("ok"):
        ctx.problem(system, f"small files differ: {r.get('bad') or r.get('error')}")
    ctx.put(system, "verify.ok", bool(r.get("ok")))


# -- baselines ------------------------------------------------------------------------------


def run_local(ctx: Ctx, scenarios: set[str], can_drop: bool) -> None:
    """The plain local copy: the physical limit of this machine."""
    ds, name = ctx.ds, "local"
    big, shard = str(ds.local(ds.big)), str(ds.local(ds.shards[0]))
    mmap_args = ["--ref", shard, "--slices", str(SLICES), "--slice-bytes", str(SLICE_BYTES), "--seed", str(SEED)]
    if can_drop and scenarios & {"seq", "mmap"}:
        ctx.log("  local: first pass after drop_caches")
        ctx.drop_caches()
        if "seq" in scenarios:
            op = ctx.cat([big])
            ctx.put(name, "seq.cold_mbps", mbps(ds.size(ds.big), op))
            ctx.put(name, "seq.cold_s", op.wall_s)
        if "mmap" in scenarios:
            r = ctx.probe("mmap", shard, *mmap_args)
            ctx.put(name, "mmap.cold_s", r.get("total_s"))
            ctx.put(name, "mmap.first_slice_ms", r.get("first_slice_ms"))
    ctx.log("  local: page cache (warming the server store and the local copy)")
    ctx.warm_server()
    ctx.warm(ds.local(r) for r in [ds.big, *ds.shards])
    if "seq" in scenarios:
        ctx.put(name, "seq.warm_mbps", mbps(ds.size(ds.big), ctx.cat([big])))
    if "ttfb" in scenarios:
        r = ctx.probe("ttfb", big)
        for k in ("total_ms", "open_ms", "read_ms"):
            ctx.put(name, f"ttfb.{k}", r.get(k))
    if "mmap" in scenarios:
        ctx.put(name, "mmap.cached_s", ctx.probe("mmap", shard, *mmap_args).get("total_s"))
    if "shards" in scenarios:
        op = ctx.cat([str(ds.local(r)) for r in ds.shards])
        ctx.put(name, "shards.agg_mbps", mbps(sum(ds.size(r) for r in ds.shards), op))
    if "meta" in scenarios:
        top = str(ds.local("many"))
        for op_name, script in META_CMDS.items():
            op = ctx.run([["bash", "-c", script, "_", top]], capture=True)
            ctx.put(name, f"meta.{op_name}_s", op.wall_s)


def run_boto3(ctx: Ctx, scenarios: set[str]) -> None:
    """boto3 download_file, default TransferConfig: "download everything first"."""
    ds, name = ctx.ds, "boto3"
    dest = ctx.workdir / "downloads"

    def download(rels: list[str], *extra: str) -> tuple[dict[str, Any], Traffic | None]:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        before = ctx.traffic()
        refs = [arg for x in rels for arg in ("--ref", str(ds.local(x)))]
        r = ctx.probe("download", "--endpoint", ctx.ep.url, "--bucket", ctx.ep.bucket, "--dest", str(dest),
                      *refs, *extra, *[ds.key(x) for x in rels])
        tr = ctx.since(before)
        shutil.rmtree(dest, ignore_errors=True)
        if r.get("error") or r.get("errors"):
            ctx.problem(name, f"download of {rels}: {r.get('error') or r.get('errors')}")
            return {}, tr
        ctx.put(name, "verify.ok", bool(r.get("ok")))
        return r, tr

    size = ds.size(ds.big)
    if scenarios & {"seq", "ttfb", "readers"}:
        r, tr = download([ds.big])
        if r:
            ctx.put(name, "seq.cold_s", r["download_s"])
            ctx.put(name, "seq.cold_mbps", size / 1e6 / r["download_s"])
            ctx.put(name, "seq.cold_srv_mib", key_mib(tr, ds.key(ds.big)))
            ctx.put(name, "seq.cold_requests", tr.summary() if tr else None)
            ctx.put(name, "seq.cpu_per_gib", r["cpu_s"] / (size / GiB))
            ctx.put(name, "res.peak_rss_seq_mib", (r.get("vmhwm_kib") or 0) / 1024 or None)
            # Downloading first, the first byte and every reader wait for all of it.
            ctx.put(name, "ttfb.total_ms", r["download_s"] * 1e3)
            ctx.put(name, "readers.wall_s", r["download_s"])
    if "mmap" in scenarios:
        rel = ds.shards[0]
        r, tr = download([rel], "--mmap-slices", str(SLICES), "--slice-bytes", str(SLICE_BYTES), "--seed", str(SEED))
        if r:
            ctx.put(name, "mmap.cold_s", r["total_s"])
            ctx.put(name, "mmap.first_slice_ms", r["download_s"] * 1e3 + r["mmap"]["first_slice_ms"])
            ctx.put(name, "mmap.srv_mib", key_mib(tr, ds.key(rel)))
    if "shards" in scenarios:
        r, _ = download(ds.shards)
        if r:
            ctx.put(name, "shards.agg_mbps", sum(ds.size(x) for x in ds.shards) / 1e6 / r["download_s"])
