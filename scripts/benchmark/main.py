"""lazyfs's benchmark (`sudo scripts/bench`): lazyfs cold and warm against
boto3 download_file, a plain local file, a minimal pyfuse3 pass-through, and
the peers s3fs-fuse and rclone when installed, all against one S3 server in
one run; on plain loopback or on an emulated object store (--mode wan).  The
model-load scenario (--scenarios model) adds the model loaders as peers: the
Run:ai Model Streamer and s3torchconnector (benchmodelload).

It prints a markdown table of results and one of the issue's targets, and
writes the same plus every raw measurement as JSON (--out).  Everything bulky
lives in .bench/ (git-ignored): the node modules, the generated dataset, the
server's store (kept between runs), the results, and a work folder per run
that is removed at the end.  Needs root: FUSE mounts, drop_caches, network
namespaces.  See docs in the modules: benchscenarios (what is measured),
benchnet (the wan emulation), benchserver (the server), benchdata (dataset),
benchcheckpoint and benchmodelload (the model-load scenario).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn, Sequence

from benchmark import net as benchnet
from benchmark import report as benchreport
from benchmark.checkpoint import Checkpoint, ensure_checkpoint, ensure_checkpoint_uploaded
from benchmark.data import PROFILES, Dataset, ensure_local, ensure_uploaded, object_checksums
from benchmark.modelload import run_model
from benchmark.mounts import LazyfsMounter, Mounter, PassthroughMounter, RcloneMounter, S3fsMounter
from benchmark.scenarios import SCENARIOS, Ctx, Results, run_boto3, run_local, run_mounted
from benchmark.server import Endpoint, LocalS3, remote_endpoint, s3_client
from lazyfs import __version__
from support.mountproc import force_unmount

# runai (the Run:ai Model Streamer) and s3torch (s3torchconnector) load models only (--scenarios model).
SYSTEMS = ("lazyfs", "boto3", "s3fs", "rclone", "local", "passthrough", "runai", "s3torch")
BUCKET = "lazyfs-bench"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small dataset: 256 MiB file, 4 x 64 MiB, 1,000 small files, "
                   "a 254 MiB checkpoint in 2 shards (default: 2.05 GiB in 4)")
    p.add_argument("--mode", choices=("loopback", "wan"), default="loopback",
                   help="wan: the server in a network namespace, per-request latency, per-connection bandwidth")
    p.add_argument("--endpoint-url", metavar="URL", help="a real S3 or MinIO instead of the local server "
                   "(credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; no server-side counters)")
    p.add_argument("--bucket", default=BUCKET, help=f"bucket to use (default {BUCKET}; must exist with --endpoint-url)")
    p.add_argument("--object-checksum", choices=("CRC32", "CRC32C", "CRC64NVME"), default="",
                   help="objects carry this additional checksum, as real S3 keeps a CRC64NVME of every object "
                   "(default: none, an MD5 ETag only): the bench's server answers it and names it in listings; "
                   "with --endpoint-url the uploads send it, for a store that keeps it (SeaweedFS)")
    p.add_argument("--out", metavar="FILE", help="JSON results (the markdown goes beside it as .md); "
                   "default .bench/results/<time>-<profile>-<mode>.json")
    p.add_argument("--only", metavar="LIST", help=f"comma-separated systems, of: {','.join(SYSTEMS)}")
    p.add_argument("--scenarios", metavar="LIST", help=f"comma-separated, of: {','.join(SCENARIOS)}")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="run everything N times; report medians")
    p.add_argument("--wan-delay-ms", type=float, default=30.0, help="wan: first-byte latency per request")
    p.add_argument("--wan-rate-mbit", type=float, default=600.0, help="wan: bandwidth per connection (600 = 75 MB/s)")
    p.add_argument("--op-timeout", type=float, default=600.0, help="seconds per measured operation")
    p.add_argument("--mount-timeout", type=float, default=60.0)
    p.add_argument("--lazyfs-log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--lazyfs-arg", metavar="ARG", action="append", default=[],
                   help="an extra flag for every lazyfs mount, e.g. --lazyfs-arg=--max-connections=8 (repeatable)")
    p.add_argument("--home", default=os.environ.get("LAZYFS_BENCH_HOME") or ".bench",
                   help="where node modules, data, the server store and results live (default .bench)")
    p.add_argument("--keep-workdir", action="store_true", help="keep stores and logs of this run's work folder")
    p.add_argument("--py-spy", metavar="DIR", help="sample every lazyfs daemon with py-spy (the bench extra) into "
                   "DIR/<mount tag>.txt, collapsed stacks; it costs CPU, so do not compare times of such a run")
    a = p.parse_args(argv)
    a.systems = _pick(p, a.only, SYSTEMS, "--only")
    a.scenario_set = set(_pick(p, a.scenarios, SCENARIOS, "--scenarios"))
    if not 1 <= a.repeat <= 20:
        p.error("--repeat must be between 1 and 20")
    if a.endpoint_url and a.mode == "wan":
        p.error("--mode wan emulates a remote store on this machine; it cannot apply to --endpoint-url")
    return a


def _pick(p: argparse.ArgumentParser, text: str | None, known: Sequence[str], flag: str) -> list[str]:
    if not text:
        return list(known)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        p.error(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return [s for s in known if s in chosen]


# -- things to clean up, even after a crash of an earlier run ------------------------------------


class Registry:
    """PIDs of the long-lived children of this run, in its work folder, so
    that a later run can stop what a killed one left running."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "pids.json"
        self.pids: dict[str, str] = {}

    def note(self, pid: int, alive: bool) -> None:
        if alive:
            self.pids[str(pid)] = _cmdline(pid)
        else:
            self.pids.pop(str(pid), None)
        self.path.write_text(json.dumps(self.pids))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [m for m in points if m == str(root) or m.startswith(f"{root}/")]


def reap_stale(work_root: Path) -> None:
    """Unmount, stop and remove what runs that died left behind."""
    for d in sorted(work_root.glob("*"))[:100]:
        if not d.name.isdigit() or Path(f"/proc/{d.name}").exists():
            continue
        log(f"cleaning up after an earlier run that died: {d}")
        for m in _mounts_under(d):
            force_unmount(m)
        try:
            pids = json.loads((d / "pids.json").read_text())
        except (OSError, ValueError):
            pids = {}
        for pid, cmd in pids.items():
            if cmd and _cmdline(int(pid)) == cmd:  # the same process, not a reused PID
                os.kill(int(pid), signal.SIGKILL)
        if not _mounts_under(d):
            shutil.rmtree(d, ignore_errors=True)
    for name in benchnet.reap_stale():
        log(f"removed a network namespace an earlier run left: {name}")


def _raise_interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


# -- the run ------------------------------------------------------------------------------


def mounters(systems: Sequence[str], lazyfs_log_level: str, lazyfs_args: Sequence[str] = (),
             profile_dir: Path | None = None) -> tuple[list[Mounter], list[str]]:
    """The filesystems to measure, and why any were skipped."""
    table: dict[str, Mounter] = {"lazyfs": LazyfsMounter(lazyfs_log_level, lazyfs_args, profile_dir),
                                 "passthrough": PassthroughMounter(),
                                 "s3fs": S3fsMounter(), "rclone": RcloneMounter()}
    order = ["passthrough", "lazyfs", "s3fs", "rclone"]
    chosen, skipped = [], []
    for name in order:
        if name in systems:
            why = table[name].missing()
            if why:
                skipped.append(f"{name}: skipped: {why}")
            else:
                chosen.append(table[name])
    return chosen, skipped


def check_if_match(client: Any, ep: Endpoint, ds: Dataset) -> str:
    """What the server does with a GET whose If-Match names another ETag."""
    try:
        r = client.get_object(Bucket=ep.bucket, Key=ds.key(ds.big), Range="bytes=0-15", IfMatch='"0123abcd"')
        r["Body"].read()
        return f"IGNORED: a GET with a wrong If-Match got {r['ResponseMetadata']['HTTPStatusCode']}"
    except Exception as e:
        status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        return "honoured (412 on a wrong ETag)" if status == 412 else f"unexpected: {e}"


def warm_listing(client: Any, ep: Endpoint, ds: Dataset) -> None:
    """List everything once, outside any measurement, so that the server's
    metadata cache (s3rver_wrapper.js) is warm for the first scenario too."""
    for _ in client.get_paginator("list_objects_v2").paginate(Bucket=ep.bucket, Prefix=f"{ds.profile.name}/"):
        pass


def run_all(a: argparse.Namespace, ctx: Ctx, ms: list[Mounter], ck: Checkpoint | None) -> None:
    fs_scenarios = a.scenario_set - {"model"}
    for rep in range(a.repeat):
        ctx.rep = rep
        log(f"=== repetition {rep + 1} of {a.repeat} ===")
        if fs_scenarios:
            if "local" in a.systems:
                ctx.guard("local", "baseline", lambda: run_local(ctx, fs_scenarios, os.geteuid() == 0))
            else:
                ctx.warm_server()
            if "boto3" in a.systems:
                log("  boto3 download_file")
                ctx.guard("boto3", "baseline", lambda: run_boto3(ctx, fs_scenarios))
            for m in ms:
                run_mounted(ctx, m, fs_scenarios)
        if ck is not None:
            # Last: it drops the page cache before every load.
            lazy = next((m for m in ms if isinstance(m, LazyfsMounter)), None)
            run_model(ctx, ck, a.systems, lazy)


def versions(model: bool = False) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "not installed"

    import boto3
    import pyfuse3
    out = {"lazyfs": f"{__version__} ({lazyfs_revision()})", "python": platform.python_version(),
           "boto3": boto3.__version__, "pyfuse3": pyfuse3.__version__, "node": first_line(["node", "--version"]),
           "s3fs": first_line(["s3fs", "--version"]), "rclone": first_line(["rclone", "version"]),
           "kernel": platform.release()}
    if model:
        from importlib import metadata

        for dist in ("torch", "safetensors", "runai-model-streamer", "runai-model-streamer-s3", "s3torchconnector"):
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = "not installed"
    return out


def lazyfs_revision() -> str:
    """The commit the measured lazyfs came from, and whether its sources had
    uncommitted changes (the numbers then belong to that working tree)."""
    import lazyfs

    src = Path(lazyfs.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "not a git checkout"
    if not head:
        return "not a git checkout"
    return f"commit {head}" + (", with uncommitted changes" if dirty else "")


def served_checksums(a: argparse.Namespace, ds: Dataset, ck: Checkpoint | None, home: Path) -> dict[str, list[str]]:
    """What the bench's server answers as each object's additional checksum."""
    objects = {f"{a.bucket}/{ds.key(rel)}": ds.local(rel) for rel in ds.files}
    if ck is not None:
        objects.update({f"{a.bucket}/{ck.key(name)}": ck.root / name for name in ck.files})
    return object_checksums(objects, a.object_checksum, home / "data" / f"checksums-{ds.profile.name}.json")


def render(a: argparse.Namespace, ep: Endpoint, ds: Dataset, results: Results, skipped: list[str],
           if_match: str, vers: dict[str, str], ck: Checkpoint | None = None) -> tuple[str, dict[str, Any]]:
    values = results.values
    benchreport.add_mount_metrics(values, results.mounts, a.repeat)
    summary = benchreport.summarize(values)
    targets = benchreport.evaluate(values, a.repeat, a.mode)
    p = ds.profile
    mode = ("wan: " + f"{a.wan_delay_ms:g} ms per request, {a.wan_rate_mbit:g} Mbit/s per connection"
            if a.mode == "wan" else "loopback") if not a.endpoint_url else "remote endpoint"
    head = [f"## lazyfs benchmark: {p.name} dataset, {mode}, {a.repeat} repetition(s)", "",
            f"- server: {ep.description}",
            f"- If-Match on GET: {if_match}; s3rver 3.7.1 itself ignores If-Match (answers 206 with a wrong "
            "ETag, never rejects a request for it), the wrapper enforces it as S3 does" if not a.endpoint_url
            else f"- If-Match on GET: {if_match}",
            f"- objects' additional checksum: {a.object_checksum or 'none (an MD5 ETag only)'}",
            f"- dataset: {benchreport.size_label(p.big_mib)} file, {p.shards} x {benchreport.size_label(p.shard_mib)}"
            f" shards, {p.small_files:,} x {p.small_kib} KiB files in {p.small_dirs} folders",
            *([benchreport.checkpoint_line(ck)] if ck else []),
            "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
            f"- machine: {os.cpu_count()} CPUs, shared and noisy: compare ratios, not absolute times", ""]
    if a.lazyfs_arg:
        head.insert(-1, "- lazyfs mounted with: " + " ".join(a.lazyfs_arg))
    if a.py_spy:
        head.insert(-1, "- every lazyfs daemon sampled by py-spy (--py-spy): its times are not comparable")
    fs_systems = {s: v for s, v in summary.items() if not s.startswith(benchreport.MODEL_PREFIX)}
    md = "\n".join(head)
    if any(fs_systems.values()):
        md += "\n### Results (medians)\n\n" + benchreport.results_table(fs_systems, p)
    if ck is not None:
        md += "\n\n### Model load (medians)\n\n" + benchreport.model_table(summary, ck)
    fs_targets = [t for t in targets if not t["target"].startswith("model ")]
    model_targets = [t for t in targets if t["target"].startswith("model ")]
    if any(fs_systems.values()):
        md += "\n\n### Targets (ratios within each repetition, median)\n\n" + benchreport.targets_table(fs_targets)
    if ck is not None:
        md += ("\n\n### Model-load targets (issue 13; ratios within each repetition, median; lazyfs includes its "
               "mount)\n\n" + benchreport.targets_table(model_targets))
    notes = skipped + results.problems
    if notes:
        md += "\n\n### Problems and skipped systems\n\n" + "\n".join(f"- {n}" for n in _dedupe(notes))
    data = {"meta": {"argv": sys.argv[1:], "date": dt.datetime.now().isoformat(timespec="seconds"),
                     "profile": asdict(p), "mode": a.mode, "endpoint": ep.description, "if_match": if_match,
                     "wan": {"delay_ms": a.wan_delay_ms, "rate_mbit": a.wan_rate_mbit} if a.mode == "wan" else None,
                     "repeat": a.repeat, "systems": a.systems, "scenarios": sorted(a.scenario_set),
                     "checkpoint": ({"shape": asdict(ck.shape), "files": {f: v[0] for f, v in ck.files.items()},
                                     "tensors": len(ck.crcs), "total_bytes": ck.total_bytes} if ck else None),
                     "versions": vers, "skipped": skipped},
            "summary": summary, "targets": targets, "raw": values,
            "mounts": [asdict(m) for m in results.mounts], "problems": results.problems, "markdown": md}
    return md + "\n", data


def _dedupe(lines: list[str], limit: int = 60) -> list[str]:
    seen: dict[str, None] = {}
    for line in lines:
        seen.setdefault(line, None)
    out = list(seen)
    return out[:limit] + ([f"... and {len(out) - limit} more (see the JSON)"] if len(out) > limit else [])


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("scripts/bench must run as root (FUSE mounts, drop_caches, network namespaces): sudo scripts/bench")
    home = Path(a.home).resolve()
    node_modules = home / "node" / "node_modules"
    if not a.endpoint_url and not (node_modules / "s3rver" / "package.json").exists():
        sys.exit(f"s3rver is not installed in {node_modules}: run scripts/bench, which installs it")
    reap_stale(home / "work")
    workdir = home / "work" / str(os.getpid())
    (workdir / "logs").mkdir(parents=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    profile = PROFILES["quick" if a.quick else "default"]
    out = Path(a.out) if a.out else home / "results" / f"{stamp}-{profile.name}-{a.mode}.json"
    # SIGINT too: a job started in the background by a script inherits it
    # ignored, and Python then leaves it so.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    ms, skipped = mounters(a.systems, a.lazyfs_log_level, a.lazyfs_arg, Path(a.py_spy).resolve() if a.py_spy else None)
    for s in skipped:
        log(s)
    registry = Registry(workdir)
    link: benchnet.WanLink | None = None
    server: LocalS3 | None = None
    ctx: Ctx | None = None
    try:
        ds = ensure_local(profile, home / "data", log)
        ck = ensure_checkpoint(profile, home / "data", log) if "model" in a.scenario_set else None
        if a.endpoint_url:
            ep = remote_endpoint(a.endpoint_url, a.bucket)
        else:
            if a.mode == "wan":
                link = benchnet.WanLink(a.wan_rate_mbit, workdir)
                link.up()
            checksums = None
            if a.object_checksum:
                log(f"the server keeps a {a.object_checksum} of every object, as S3 does")
                checksums = workdir / "checksums.json"
                checksums.write_text(json.dumps(served_checksums(a, ds, ck, home)))
            server = LocalS3(node_modules, home / "s3rver", workdir, a.bucket, link,
                             a.wan_delay_ms if link else 0.0, checksums)
            server.start()
            registry.note(server.pid or 0, True)
            ep = server.endpoint
        log(f"server: {ep.description}")
        client = s3_client(ep)
        # Only a remote store is sent the checksum with the uploads: s3rver would keep the
        # aws-chunked framing as the object's bytes, and the wrapper answers the harness's.
        sent = a.object_checksum if a.endpoint_url else ""
        ensure_uploaded(ds, client, ep.bucket, log, sent)
        if ck is not None:
            ensure_checkpoint_uploaded(ck, client, ep.bucket, log, sent)
        if server is not None:
            warm_listing(client, ep, ds)
        if_match = check_if_match(client, ep, ds)
        ctx = Ctx(ep, server, ds, workdir, Results(), log, registry.note, a.op_timeout, a.mount_timeout)
        t0 = time.monotonic()
        run_all(a, ctx, ms, ck)
        md, data = render(a, ep, ds, ctx.results, skipped, if_match, versions(ck is not None), ck)
        data["meta"]["elapsed_s"] = time.monotonic() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, default=str))
        out.with_suffix(".md").write_text(md)
        print(md)
        log(f"wrote {out} and {out.with_suffix('.md')} ({time.monotonic() - t0:.0f} s of measurements)")
        return 0
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'SIGINT'}); cleaning up")
        return 130
    finally:
        _cleanup(ctx, server, link, workdir, out, a.keep_workdir)


def _cleanup(ctx: Ctx | None, server: LocalS3 | None, link: benchnet.WanLink | None, workdir: Path,
             out: Path, keep: bool) -> None:
    """Everything this run started, in order: mounts, server, namespace."""
    # A second Ctrl-C must not cut the cleanup short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if ctx is not None:
            for mt in list(ctx.live):
                ctx.unmount(mt)
        for m in _mounts_under(workdir):
            force_unmount(m)
        if server is not None:
            server.stop()
        if link is not None:
            link.down()
        logs = out.parent / f"{out.stem}-logs"
        if (workdir / "logs").exists():
            shutil.copytree(workdir / "logs", logs, dirs_exist_ok=True)
        if not keep and not _mounts_under(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
