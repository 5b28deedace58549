"""Helpers for end-to-end tests: filesystem access under a timeout, `lazyfs
mount` subprocesses that are always torn down, the CLI run as a user runs it.

Nothing here can hang a run: every filesystem access goes through `FS` (a
thread with a timeout), and every mount is torn down in escalating steps
(SIGTERM, fusermount3 -u, -uz, SIGKILL) even when the test failed.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from support.mountproc import MountProcess, force_unmount, is_mounted
from support.proxy import S3Proxy
from support.s3server import clean_env

FS_TIMEOUT = 20.0

# The ranged GETs' clients (--transfer-client).  A test (or a module, in its
# pytestmark) marked `on_both_clients` runs once on each; other mounts use the
# default, or the client LAZYFS_TEST_TRANSFER_CLIENT names (tests/e2e/conftest.py).
TRANSFER_CLIENTS = ("boto3", "crt")
on_both_clients = pytest.mark.parametrize("transfer_client", TRANSFER_CLIENTS, indirect=True)


class FS:
    """Filesystem access under a timeout, from a worker thread, so a bug in the
    daemon fails the test instead of hanging it."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="fs")

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = FS_TIMEOUT) -> Any:
        return self.start(fn, *args).result(timeout=timeout)

    def start(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run `fn` in the background; wait for it with `.result(timeout=...)`."""
        return self._pool.submit(fn, *args)

    def read(self, path: str | Path, timeout: float = FS_TIMEOUT) -> bytes:
        return self.run(lambda: Path(path).read_bytes(), timeout=timeout)

    def listdir(self, path: str | Path) -> list[str]:
        return sorted(self.run(os.listdir, str(path)))

    def stat(self, path: str | Path) -> os.stat_result:
        return self.run(os.stat, str(path))

    def stat_errno(self, path: str | Path) -> int:
        """The errno a `stat` of `path` fails with, 0 if it succeeds."""
        try:
            self.stat(path)
        except OSError as e:
            return e.errno or 0
        return 0

    def sh(self, *argv: str, timeout: float = FS_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, *args: str, timeout: float = FS_TIMEOUT) -> str:
        """Run Python in a child process: for access that holds the GIL while
        the kernel waits on the mount (mmap page faults), so a hang is killable."""
        res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"child failed ({res.returncode}): {res.stderr[-2000:]}")
        return res.stdout

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Mounted:
    path: Path
    store: Path
    process: MountProcess

    def file(self, key: str) -> Path:
        return self.path / key

    def log(self) -> str:
        return self.process.log()

    def ready_line(self) -> str:
        return next(line for line in self.process.stdout_lines if line.startswith("lazyfs: ready"))

    def stop(self, timeout: float = 15.0) -> int | None:
        return self.process.stop(timeout=timeout)


class Mounter:
    """Starts `lazyfs mount` subprocesses for one test and tears all of them down."""

    def __init__(self, tmp_path: Path, proxy: S3Proxy, transfer_client: str = "") -> None:
        self.tmp_path = tmp_path
        self.proxy = proxy
        # "crt" or "boto3": every mount of the test sends its ranged GETs that way
        # ("": the default).
        self.transfer_client = transfer_client
        self.started: list[Mounted] = []
        self._n = itertools.count()

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(extra)

    def __call__(self, *args: str, mountpoint: Path | None = None, store: Path | None = None,
                 endpoint: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 30.0, wrapper: Sequence[str] = ()) -> Mounted:
        n = next(self._n)
        mnt = mountpoint or self.tmp_path / f"mnt{n}"
        if not is_mounted(mnt):  # mkdir's stat of a mount whose daemon hangs would hang too
            mnt.mkdir(parents=True, exist_ok=True)
        argv = list(args)
        if endpoint != "":  # "": none, the profile's or the environment's
            argv += ["--endpoint-url", endpoint or self.proxy.endpoint]
        argv += ["--log-level", "debug"]
        if self.transfer_client and "--transfer-client" not in argv:
            argv += ["--transfer-client", self.transfer_client]
        if store is not None:
            argv += ["--store", str(store)]
        proc = MountProcess(mnt, argv, env or self.env(), self.tmp_path / f"lazyfs{n}.log", wrapper=wrapper)
        m = Mounted(mnt, store or mnt, proc)
        self.started.append(m)
        proc.start(timeout=timeout)
        return m

    def cleanup(self) -> None:
        for m in self.started:
            m.process.cleanup()
            force_unmount(m.path)

    def log_problems(self, allowed: Sequence[str] = ()) -> list[str]:
        """Daemon log lines no test should cause: any traceback, and ERROR lines
        that match none of the `allowed` patterns (a test that injects faults
        names the errors it expects with @pytest.mark.log_errors)."""
        return [f"{m.process.log_path.name}: {line}" for m in self.started
                for line in unexpected_log_lines(m.log(), allowed)]


_ERROR_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) ")


def unexpected_log_lines(text: str, allowed: Sequence[str] = ()) -> list[str]:
    patterns = [re.compile(a) for a in allowed]
    out = []
    for line in text.splitlines():
        traceback = "Traceback (most recent call last)" in line
        if traceback or (_ERROR_LINE.match(line) and not any(p.search(line) for p in patterns)):
            out.append(line)
    return out


def lazyfs_cli(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60.0,
               cwd: str | Path | None = None, wrapper: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would (`python -m lazyfs ...`), optionally under a
    `wrapper` command (setpriv, to drop capabilities)."""
    return subprocess.run([*wrapper, sys.executable, "-m", "lazyfs", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env(), cwd=cwd)


def read_unless_refused(fs: FS, path: Path) -> bytes | None:
    """The file's bytes, or None while reading it is refused (EACCES: no usable credentials yet)."""
    try:
        return fs.read(path, timeout=60)
    except PermissionError:
        return None


def wait_until(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `cond` until it returns something true (e.g. a download is published)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def write_model_json(path: Path, **fields: Any) -> Path:
    path.write_text(json.dumps(fields))
    return path
