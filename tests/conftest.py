"""Fixtures: a real S3 server (moto) on loopback, a counting/fault proxy in
front of it, and real lazyfs mounts started through the CLI in subprocesses.

Nothing here can hang a run: every filesystem access goes through `fs` (a
thread with a timeout), and every mount is torn down in escalating steps
(SIGTERM, fusermount3 -u, -uz, SIGKILL) even when the test failed.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from lazyfs.testing.mountproc import MountProcess, force_unmount
from lazyfs.testing.proxy import S3Proxy
from lazyfs.testing.s3server import MotoServer, clean_env, s3_client

FS_TIMEOUT = 20.0


def _fuse_usable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if subprocess.run(["which", "fusermount3"], capture_output=True).returncode != 0:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


@pytest.fixture(scope="session")
def fuse_ok() -> None:
    problem = _fuse_usable()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE tests must run in CI, but {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(log_path=tmp_path_factory.mktemp("moto") / "moto.log")
    with server:
        yield server


@pytest.fixture
def s3(moto: MotoServer) -> Any:
    """A boto3 client talking to moto directly (not counted by the proxy)."""
    return s3_client(moto.endpoint)


_bucket_ids = itertools.count()


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"b{next(_bucket_ids)}-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[S3Proxy]:
    with S3Proxy(moto.endpoint) as p:
        yield p


class FS:
    """Filesystem access under a timeout, from a worker thread, so a bug in the
    daemon fails the test instead of hanging it."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="fs")

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = FS_TIMEOUT) -> Any:
        return self._pool.submit(fn, *args).result(timeout=timeout)

    def read(self, path: str | Path, timeout: float = FS_TIMEOUT) -> bytes:
        return self.run(lambda: Path(path).read_bytes(), timeout=timeout)

    def listdir(self, path: str | Path) -> list[str]:
        return sorted(self.run(os.listdir, str(path)))

    def stat(self, path: str | Path) -> os.stat_result:
        return self.run(os.stat, str(path))

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


@pytest.fixture
def fs() -> Iterator[FS]:
    helper = FS()
    yield helper
    helper.close()


@dataclass
class Mounted:
    path: Path
    store: Path
    process: MountProcess

    def file(self, key: str) -> Path:
        return self.path / key

    def log(self) -> str:
        return self.process.log()

    def stop(self, timeout: float = 15.0) -> int | None:
        return self.process.stop(timeout=timeout)


class Mounter:
    """Starts `lazyfs mount` subprocesses for one test and tears all of them down."""

    def __init__(self, tmp_path: Path, proxy: S3Proxy) -> None:
        self.tmp_path = tmp_path
        self.proxy = proxy
        self.started: list[Mounted] = []
        self._n = itertools.count()

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(extra)

    def __call__(self, *args: str, mountpoint: Path | None = None, store: Path | None = None,
                 endpoint: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> Mounted:
        n = next(self._n)
        mnt = mountpoint or self.tmp_path / f"mnt{n}"
        mnt.mkdir(parents=True, exist_ok=True)
        argv = list(args)
        argv += ["--endpoint-url", endpoint or self.proxy.endpoint, "--log-level", "debug"]
        if store is not None:
            argv += ["--store", str(store)]
        proc = MountProcess(mnt, argv, env or self.env(), self.tmp_path / f"lazyfs{n}.log")
        m = Mounted(mnt, store or mnt, proc)
        self.started.append(m)
        proc.start(timeout=timeout)
        return m

    def cleanup(self) -> None:
        for m in self.started:
            m.process.cleanup()
            force_unmount(m.path)


@pytest.fixture
def mount(fuse_ok: None, tmp_path: Path, proxy: S3Proxy) -> Iterator[Mounter]:
    m = Mounter(tmp_path, proxy)
    try:
        yield m
    finally:
        m.cleanup()


def lazyfs_cli(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60.0,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would (`python -m lazyfs ...`)."""
    return subprocess.run([sys.executable, "-m", "lazyfs", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env(), cwd=cwd)


def wait_until(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `cond` until it returns something true (e.g. a download is published)."""
    import time

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
