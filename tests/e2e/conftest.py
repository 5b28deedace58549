"""End-to-end fixtures: a real S3 server (moto) on loopback, a counting/fault
proxy in front of it, and real lazyfs mounts started through the CLI in
subprocesses (see support/mounting.py).

The compatibility matrix (marker `stores`) runs the same kind of test against
each server of support/stores.py: parametrize a test with
`pytest.mark.parametrize("s3_store", STORE_NAMES, indirect=True)` and use the
`store_*` fixtures, which mirror `s3`, `bucket`, `proxy` and `mount`.

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

from support.mounting import FS, TRANSFER_CLIENTS, Mounter
from support.proxy import S3Proxy
from support.s3server import MotoServer, s3_client
from support.stores import STORES, Store, StoreUnavailable


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


# Mounts of tests not marked `on_both_clients` use the client this names, or
# the default: the whole suite can run on either
# (`LAZYFS_TEST_TRANSFER_CLIENT=crt scripts/test tests/e2e`).
SUITE_TRANSFER_CLIENT = os.environ.get("LAZYFS_TEST_TRANSFER_CLIENT", "")
if SUITE_TRANSFER_CLIENT not in ("", *TRANSFER_CLIENTS):
    raise pytest.UsageError(f"LAZYFS_TEST_TRANSFER_CLIENT must be one of {TRANSFER_CLIENTS}")


@pytest.fixture
def transfer_client(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", SUITE_TRANSFER_CLIENT))


@pytest.fixture
def mount(fuse_ok: None, tmp_path: Path, proxy: S3Proxy, transfer_client: str,
          request: pytest.FixtureRequest) -> Iterator[Mounter]:
    yield from _mounter(tmp_path, proxy, request, transfer_client)


def _mounter(tmp_path: Path, proxy: S3Proxy, request: pytest.FixtureRequest,
             transfer_client: str = "") -> Iterator[Mounter]:
    m = Mounter(tmp_path, proxy, transfer_client)
    try:
        yield m
    finally:
        m.cleanup()
    marker = request.node.get_closest_marker("log_errors")
    problems = m.log_problems(marker.args if marker else ())
    if problems:
        pytest.fail("the daemon logged what no test should cause:\n" + "\n".join(problems[:20]),
                    pytrace=False)


# -- the compatibility matrix ---------------------------------------------------------

@pytest.fixture(scope="session")
def s3_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One S3 server of support/stores.py (the test's parameter names it),
    started once per session and killed at the end.  A server that cannot be
    installed here skips its tests, except under CI=true."""
    name = request.param
    store = STORES[name](tmp_path_factory.mktemp(name))
    try:
        store.start()
    except StoreUnavailable as e:
        store.stop()
        if os.environ.get("CI"):
            pytest.fail(f"{name} must run in CI, but: {e}")
        pytest.skip(f"{name} unavailable here: {e}")
    except BaseException:
        store.stop()
        raise
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture
def store_s3(s3_store: Store) -> Any:
    """A boto3 client talking to the store directly (not counted by the proxy)."""
    return s3_store.client()


@pytest.fixture
def store_bucket(store_s3: Any) -> str:
    name = f"m{next(_bucket_ids)}-{uuid.uuid4().hex[:8]}"
    store_s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def store_proxy(s3_store: Store) -> Iterator[S3Proxy]:
    with S3Proxy(s3_store.endpoint) as p:
        yield p


@pytest.fixture
def store_mount(fuse_ok: None, tmp_path: Path, store_proxy: S3Proxy, transfer_client: str,
                request: pytest.FixtureRequest) -> Iterator[Mounter]:
    yield from _mounter(tmp_path, store_proxy, request, transfer_client)
