"""The filesystems the benchmark mounts: lazyfs, the pyfuse3 pass-through,
s3fs-fuse and rclone.  Each runs in the foreground as a child of its own
session, with a clean environment; each is stopped with SIGTERM, then
`fusermount3 -u`, then `-uz`, then SIGKILL, whatever happened; its peak RSS
(VmHWM) and CPU seconds are read from /proc just before it is stopped.

Every mount serves one folder of the dataset (`models` or `many`), the way a
model server mounts its model's folder.  lazyfs keeps key paths, so its files
appear under MNT/<profile>/<folder>/; the others show the folder's files at MNT.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from benchmark.data import Dataset
from benchmark.server import Endpoint
from lazyfs.config import MountConfig, default_of
from support.mountproc import MountFailed, MountProcess, force_unmount, is_mounted

DEFAULT_READ_AHEAD = default_of(MountConfig, "read_ahead")

MiB = 1 << 20
# lazyfs log lines worth reporting (the rest is routine).
_LOG_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


class MountError(RuntimeError):
    pass


@dataclass
class ProcSample:
    vmhwm_kib: int | None = None
    cpu_s: float | None = None  # user + system, all threads


def proc_sample(pid: int) -> ProcSample:
    out = ProcSample()
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out.vmhwm_kib = int(line.split()[1])
        raw = Path(f"/proc/{pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces
        out.cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return out


@dataclass
class MountRecord:
    system: str
    tag: str
    mount_s: float
    peak_rss_mib: float | None = None
    cpu_s: float | None = None
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class MountSpec:
    """What one mount serves and where."""

    folder: str  # "models" or "many"
    mnt: Path
    store: Path  # lazyfs --store, s3fs use_cache, rclone --cache-dir (unused by the pass-through)
    tag: str
    log_path: Path
    private: Path  # for credentials files: never copied into the results
    extra: list[str] = field(default_factory=list)


class Mounted:
    """A live mount.  `path(rel)` is where dataset file `rel` appears."""

    def __init__(self, system: str, spec: MountSpec, base: Path, mount_s: float) -> None:
        self.system = system
        self.spec = spec
        self.base = base
        self.record = MountRecord(system, spec.tag, mount_s)
        self._stopped = False

    def path(self, rel: str) -> str:
        return str(self.base / rel.removeprefix(self.spec.folder + "/"))

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def sample(self) -> ProcSample:
        return proc_sample(self.pid)

    def _terminate(self) -> int | None:
        raise NotImplementedError

    def stop(self) -> MountRecord:
        """Idempotent; never raises."""
        if self._stopped:
            return self.record
        self._stopped = True
        s = self.sample()
        self.record.peak_rss_mib = s.vmhwm_kib / 1024 if s.vmhwm_kib else None
        self.record.cpu_s = s.cpu_s
        try:
            self.record.exit_code = self._terminate()
        except Exception as e:  # teardown goes on
            self.record.problems.append(f"stopping: {type(e).__name__}: {e}")
        force_unmount(self.spec.mnt)
        return self.record

    def __enter__(self) -> Mounted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CommandMounted(Mounted):
    """Any foreground FUSE daemon, ready once its mountpoint is in /proc/mounts."""

    def __init__(self, system: str, spec: MountSpec, base: Path, argv: list[str], env: dict[str, str],
                 timeout: float) -> None:
        t0 = time.monotonic()
        with open(spec.log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        super().__init__(system, spec, base, 0.0)
        deadline = t0 + timeout
        while not is_mounted(spec.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise MountError(f"{system} did not mount (exit {self.proc.returncode}): {_tail(spec.log_path)}")
            time.sleep(0.01)
        self.record.mount_s = time.monotonic() - t0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _terminate(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                force_unmount(self.spec.mnt)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
        return self.proc.returncode


class LazyfsMounted(Mounted):
    def __init__(self, spec: MountSpec, base: Path, args: list[str], env: dict[str, str], timeout: float,
                 profile_dir: Path | None = None) -> None:
        t0 = time.monotonic()
        self.mp = MountProcess(spec.mnt, args, env, spec.log_path, python=sys.executable)
        self.spy: subprocess.Popen[bytes] | None = None
        super().__init__("lazyfs", spec, base, 0.0)
        try:
            self.mp.start(timeout)
        except MountFailed as e:
            self._stopped = True
            self.mp.cleanup()
            raise MountError(str(e)[-1500:]) from None
        self.record.mount_s = time.monotonic() - t0
        if profile_dir is not None:
            self._start_py_spy(profile_dir / spec.tag)

    def _start_py_spy(self, out: Path) -> None:
        """Sample the daemon until it exits (--py-spy): collapsed stacks with
        native frames (the C under pyfuse3, ssl, zlib...), one line per stack
        and thread with its sample count, busy threads only; for flamegraph
        tools or `python -m benchmark.spysum`.  Native unwinding pauses the
        daemon for each sample, hence the modest rate."""
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(self.mp.pid), "--rate", "100",
                "--native", "--threads", "--format", "raw", "--output", str(out.with_suffix(".txt"))]
        with open(out.with_suffix(".log"), "wb") as log:
            self.spy = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    @property
    def pid(self) -> int:
        return self.mp.pid

    def _terminate(self) -> int | None:
        rc = self.mp.stop(signal.SIGTERM, timeout=15)
        self.mp.cleanup()
        if self.spy is not None:  # it writes its profile once the daemon is gone
            try:
                self.spy.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.spy.pid, signal.SIGKILL)
                self.spy.wait(10)
        self._scan_log()
        return rc

    def _scan_log(self) -> None:
        for line in self.mp.log().splitlines():
            if _LOG_PROBLEM.search(line):
                self.record.problems.append(line.strip()[:400])
            elif " fetched s3://" in line:
                self.record.notes.append(line.strip()[:300])


class Mounter:
    """One kind of filesystem."""

    name = ""
    binary = ""  # a program that must be on PATH, if any
    install_hint = ""

    def missing(self) -> str | None:
        """Why it cannot run here (with how to install it), or None."""
        if self.binary and not shutil.which(self.binary):
            return f"{self.binary} is not installed ({self.install_hint})"
        return None

    def mount(self, spec: MountSpec, ep: Endpoint, ds: Dataset, timeout: float) -> Mounted:
        raise NotImplementedError


class LazyfsMounter(Mounter):
    name = "lazyfs"

    def __init__(self, log_level: str = "info", extra: Sequence[str] = (), profile_dir: Path | None = None) -> None:
        self.log_level = log_level
        self.extra = list(extra)  # --lazyfs-arg: the same flags on every mount
        self.profile_dir = profile_dir  # --py-spy: sample every mount's daemon into this folder

    def mount(self, spec: MountSpec, ep: Endpoint, ds: Dataset, timeout: float) -> Mounted:
        prefix = f"{ds.profile.name}/{spec.folder}"
        args = ["--prefix", f"s3://{ep.bucket}/{prefix}", "--endpoint-url", ep.url, "--store", str(spec.store),
                "--log-level", self.log_level, *self.extra, *spec.extra]
        return LazyfsMounted(spec, spec.mnt / prefix, args, ep.env(), timeout, self.profile_dir)


def lazyfs_prefetch_args() -> list[str] | None:
    """How to ask this lazyfs for --prefetch, or None when it has no such flag."""
    res = subprocess.run([sys.executable, "-m", "lazyfs", "mount", "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "COLUMNS": "400"})
    usage = " ".join(res.stdout.split())
    m = re.search(r"\[--prefetch(?: (\S+))?", usage)
    if m is None:
        return None
    if m.group(1) and not m.group(1).startswith("["):
        return ["--prefetch", "*"]  # it wants a pattern: every file of the folder
    return ["--prefetch"]


class PassthroughMounter(Mounter):
    """benchmark.passthrough over the local copy of the dataset, with the
    kernel readahead lazyfs sets by default, so that it stays the ceiling."""

    name = "passthrough"

    def __init__(self, keep_cache: bool = True, read_ahead: int = DEFAULT_READ_AHEAD) -> None:
        self.keep_cache = keep_cache
        self.read_ahead = read_ahead

    def mount(self, spec: MountSpec, ep: Endpoint, ds: Dataset, timeout: float) -> Mounted:
        argv = [sys.executable, "-m", "benchmark.passthrough", str(ds.local(spec.folder)), str(spec.mnt),
                "--read-ahead", str(self.read_ahead)]
        if self.keep_cache:
            argv.append("--keep-cache")
        return CommandMounted(self.name, spec, spec.mnt, argv, ep.env(), timeout)


class S3fsMounter(Mounter):
    name = binary = "s3fs"
    install_hint = "apt-get install -y s3fs"

    def mount(self, spec: MountSpec, ep: Endpoint, ds: Dataset, timeout: float) -> Mounted:
        passwd = spec.private / "s3fs.passwd"
        passwd.write_text(f"{ep.access_key}:{ep.secret_key}\n")
        passwd.chmod(0o600)
        # Its cache on, 8 parallel 8 MB ranges per miss (lazyfs's part size),
        # and a stat cache large enough for the whole tree: a fair tuning.
        opts = ["ro", f"url={ep.url}", "use_path_request_style", f"passwd_file={passwd}",
                f"use_cache={spec.store}", "parallel_count=8", "multipart_size=8", "max_stat_cache_size=100000",
                "stat_cache_expire=3600", "enable_noobj_cache", f"endpoint={ep.region}", "dbglevel=warn"]
        argv = ["s3fs", f"{ep.bucket}:/{ds.profile.name}/{spec.folder}", str(spec.mnt), "-f"]
        for o in opts:
            argv += ["-o", o]
        return CommandMounted(self.name, spec, spec.mnt, argv, ep.env(), timeout)


class RcloneMounter(Mounter):
    name = binary = "rclone"
    install_hint = "apt-get install -y rclone"

    def mount(self, spec: MountSpec, ep: Endpoint, ds: Dataset, timeout: float) -> Mounted:
        conf = spec.private / "rclone.conf"
        conf.write_text("")  # the remote is configured by environment only
        env = ep.env({"RCLONE_CONFIG_LZB_TYPE": "s3", "RCLONE_CONFIG_LZB_PROVIDER": "Other",
                      "RCLONE_CONFIG_LZB_ENDPOINT": ep.url, "RCLONE_CONFIG_LZB_ACCESS_KEY_ID": ep.access_key,
                      "RCLONE_CONFIG_LZB_SECRET_ACCESS_KEY": ep.secret_key,
                      "RCLONE_CONFIG_LZB_REGION": ep.region, "RCLONE_CONFIG_LZB_FORCE_PATH_STYLE": "true"})
        # --use-server-modtime: without it rclone sends a HEAD per file that is
        # stat()ed, one at a time, which no user who lists a tree would keep.
        argv = ["rclone", "mount", f"lzb:{ep.bucket}/{ds.profile.name}/{spec.folder}", str(spec.mnt),
                "--config", str(conf), "--read-only", "--vfs-cache-mode", "full", "--cache-dir", str(spec.store),
                "--use-server-modtime", "--dir-cache-time", "1h", "--log-level", "NOTICE"]
        return CommandMounted(self.name, spec, spec.mnt, argv, env, timeout)


def _tail(path: Path, n: int = 800) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace").strip()
    except OSError:
        return ""
