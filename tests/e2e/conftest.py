"""End-to-end fixtures: a real S3 server (moto) on loopback, a counting/fault
proxy in front of it, and real lazyfs mounts started through the CLI in
subprocesses (see support/mounting.py).

Every test here fails if a daemon it started logged a traceback, or an ERROR
line the test did not declare with `@pytest.mark.log_errors(PATTERN, ...)`.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from support.mounting import FS, Mounter
from support.proxy import S3Proxy
from support.s3server import MotoServer, s3_client


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


@pytest.fixture
def fs() -> Iterator[FS]:
    helper = FS()
    yield helper
    helper.close()


@pytest.fixture
def mount(fuse_ok: None, tmp_path: Path, proxy: S3Proxy, request: pytest.FixtureRequest) -> Iterator[Mounter]:
    m = Mounter(tmp_path, proxy)
    try:
        yield m
    finally:
        m.cleanup()
    marker = request.node.get_closest_marker("log_errors")
    problems = m.log_problems(marker.args if marker else ())
    if problems:
        pytest.fail("the daemon logged what no test should cause:\n" + "\n".join(problems[:20]),
                    pytrace=False)
