"""End to end: a mount whose AWS credentials cannot be had at start, for a
reason that may pass (the pod's credential endpoint not up yet, a helper
failing or hanging, STS unreachable), starts as one whose object store is
unreachable: OFFLINE, from what its store holds, and goes live by itself once
credentials can be had.  Before, it exited 1 (`AWS credentials unavailable`),
so a restarted pod whose store held every file crash-looped until its
credential source was back.  A configuration that can never work still ends
the start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from support import credsource
from support.credsource import CredentialEndpoint, CredentialHelper
from support.mounting import FS, Mounted, Mounter, lazyfs_cli, on_both_clients, read_unless_refused, wait_until
from support.proxy import Fault, S3Proxy
from support.s3server import MotoServer

pytestmark = pytest.mark.fuse

P = "models/m"
# What the offline mount's tries of the listing log while credentials cannot be had (a WARNING, not an ERROR).
TRIES = ("listing failed",)


@pytest.fixture
def endpoint() -> Iterator[CredentialEndpoint]:
    e = CredentialEndpoint("down")
    yield e
    e.close()


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[CredentialHelper]:
    h = CredentialHelper(tmp_path / "cp")
    yield h
    h.close()


def filled_store(mount: Mounter, s3: Any, bucket: str, tmp_path: Path, fs: FS) -> tuple[Path, dict[str, bytes]]:
    """Two files, read through a first mount (with the environment's keys): on disk, the listing saved."""
    files = {f"{P}/a.bin": os.urandom(300_000), f"{P}/b.bin": os.urandom(200_000)}
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    for key, data in files.items():
        assert fs.read(m.file(key)) == data
        wait_until((store / key).exists, what="publication")
    wait_until(lambda: any((store / ".lazyfs" / "listings").glob("*.json")), what="the saved listing")
    m.stop()
    return store, files


def without_keys(mount: Mounter, **extra: str) -> dict[str, str]:
    """The test environment without its static keys (then `extra`)."""
    env = mount.env()
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    return {**env, **extra}


def started_offline(m: Mounted, fs: FS, files: dict[str, bytes], proxy: S3Proxy, cause: str) -> None:
    """OFFLINE, one WARNING naming the cause, every stored file served with no request to S3."""
    assert m.ready_line().startswith("lazyfs: ready OFFLINE: "), m.ready_line()
    said = [ln for ln in m.log().splitlines() if "starting offline" in ln]
    assert len(said) == 1 and " WARNING " in said[0] and cause in said[0].split("starting offline")[0], said
    assert "until AWS credentials can be had" in said[0], said[0]
    for key, data in files.items():
        assert fs.read(m.file(key)) == data
    assert [r for r in proxy.requests() if r["method"] != "POST"] == [], "a request reached the object store"


@on_both_clients
@pytest.mark.log_errors(*TRIES)
def test_a_container_endpoint_not_up_yet_starts_offline_and_goes_live(mount: Mounter, s3: Any, bucket: str,
                                                                      tmp_path: Path, fs: FS, proxy: S3Proxy,
                                                                      endpoint: CredentialEndpoint,
                                                                      transfer_client: str) -> None:
    store, files = filled_store(mount, s3, bucket, tmp_path, fs)
    proxy.clear()
    env = without_keys(mount, **endpoint.env("container"))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "1", store=store, env=env)
    started_offline(m, fs, files, proxy, "AWS credentials unavailable")
    status = lazyfs_cli(["status", str(m.path)])
    assert "offline" in status.stdout and "AWS credentials unavailable" in status.stdout, status.stdout
    # While it is offline, an object changes in S3; then the endpoint comes up.
    changed = f"{P}/b.bin"
    files[changed] = os.urandom(200_001)
    s3.put_object(Bucket=bucket, Key=changed, Body=files[changed])
    endpoint.set("up")
    wait_until(lambda: "online again, the object store answered" in m.log(), timeout=60, what="going live")
    assert "AWS credentials found (container-role)" in m.log()
    assert fs.read(m.file(changed)) == files[changed], "the changed object was not fetched once live"
    assert proxy.requests("GET", key=changed), "no GET of the changed object"
    signed_with = {r["access_key"] for r in proxy.requests()}
    assert signed_with == {credsource.KEY}, signed_with


def _endpoint_env(source: str, endpoint: CredentialEndpoint, helper: CredentialHelper, mount: Mounter,
                  moto: MotoServer, proxy: S3Proxy, tmp_path: Path) -> dict[str, str]:
    if source in ("container endpoint refusing", "container endpoint answering 500",
                  "container endpoint not answering"):
        endpoint.set({"container endpoint refusing": "down", "container endpoint answering 500": "500",
                      "container endpoint not answering": "hang"}[source])
        return without_keys(mount, **endpoint.env("container"))
    if source == "instance metadata unreachable":
        return without_keys(mount, **endpoint.env("imds"))
    if source == "web identity, STS unreachable":
        token = tmp_path / "token"
        token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJsYXp5ZnMifQ.c2ln")
        proxy.add(Fault("drop", method="POST", times=None))  # STS's requests: S3's are GETs
        return without_keys(mount, AWS_WEB_IDENTITY_TOKEN_FILE=str(token), AWS_ENDPOINT_URL_STS=proxy.endpoint,
                            AWS_ROLE_ARN="arn:aws:iam::123456789012:role/lazyfs-irsa",
                            AWS_ROLE_SESSION_NAME="lazyfs-test")
    helper.set({"credential_process failing": "fail", "credential_process hanging": "hang"}[source])
    return without_keys(mount, AWS_CONFIG_FILE=str(helper.config()))


SOURCES = ["container endpoint answering 500", "container endpoint not answering", "instance metadata unreachable",
           "web identity, STS unreachable", "credential_process failing", "credential_process hanging"]


@pytest.mark.log_errors(*TRIES)
@pytest.mark.parametrize("source", SOURCES)
def test_each_source_that_may_come_back_starts_offline_and_goes_live(source: str, mount: Mounter, s3: Any,
                                                                     bucket: str, tmp_path: Path, fs: FS,
                                                                     proxy: S3Proxy, moto: MotoServer,
                                                                     endpoint: CredentialEndpoint,
                                                                     helper: CredentialHelper) -> None:
    store, files = filled_store(mount, s3, bucket, tmp_path, fs)
    proxy.clear()
    env = _endpoint_env(source, endpoint, helper, mount, moto, proxy, tmp_path)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "1", "--read-timeout", "2", store=store, env=env,
              timeout=60)
    started_offline(m, fs, files, proxy, "credentials")
    endpoint.set("up")
    helper.set("up")
    proxy.clear_faults()
    wait_until(lambda: "online again, the object store answered" in m.log(), timeout=60, what="going live")
    assert "Traceback" not in m.log()


@pytest.mark.log_errors(*TRIES)
def test_a_pinned_mount_starts_as_always_and_downloads_once_credentials_can_be_had(
        mount: Mounter, s3: Any, bucket: str, tmp_path: Path, fs: FS, proxy: S3Proxy,
        endpoint: CredentialEndpoint) -> None:
    """A pinned mount asks nothing at start: it starts PINNED (before: exit 1); a download is EACCES with
    one WARNING naming the cause until the credentials can be had, then reads."""
    data = os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key=f"{P}/a.bin", Body=data)
    lock = tmp_path / "m.lock.json"
    made = lazyfs_cli(["lock", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint, "-o", str(lock)])
    assert made.returncode == 0, made.stderr
    env = without_keys(mount, **endpoint.env("container"))
    m = mount("--lock", str(lock), "--read-timeout", "4", store=tmp_path / "store", env=env, timeout=60)
    assert m.ready_line().startswith("lazyfs: ready PINNED: ")
    said = [ln for ln in m.log().splitlines() if " WARNING " in ln and "starting with the lock's listing" in ln]
    assert len(said) == 1 and "AWS credentials unavailable" in said[0], m.log()[-3000:]
    with pytest.raises(PermissionError):
        fs.read(m.file(f"{P}/a.bin"), timeout=60)
    said = [ln for ln in m.log().splitlines() if " WARNING lazyfs." in ln and "a.bin" in ln]
    assert said and "credentials" in said[0], m.log()[-3000:]
    endpoint.set("up")
    wait_until(lambda: read_unless_refused(fs, m.file(f"{P}/a.bin")) == data, timeout=60,
               what="a read once credentials came")



MISCONFIGURED = {
    "a key id without a secret": ({"AWS_ACCESS_KEY_ID": "AKIAONLYTHEKEY00001"}, 1, "AWS_SECRET_ACCESS_KEY"),
    "a container token file missing": ({"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:9/creds",
                                        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": "/nonexistent/token"}, 1,
                                       "/nonexistent/token"),
    "no such profile": ({"AWS_PROFILE": "nosuchprofile"}, 2, "nosuchprofile"),
}


@pytest.mark.parametrize("case", list(MISCONFIGURED))
def test_a_configuration_that_can_never_work_ends_the_start_even_with_a_full_store(case: str, fuse_ok: None,
                                                                                  proxy: S3Proxy, bucket: str,
                                                                                  tmp_path: Path) -> None:
    """No offline start for these: waiting would not help.  The store could serve (a prebaked file)."""
    setting, code, named = MISCONFIGURED[case]
    layer = tmp_path / "layer"
    (layer / P).mkdir(parents=True)
    (layer / P / "a.bin").write_bytes(b"a" * 1000)
    (tmp_path / "mnt").mkdir()
    env = without_keys(Mounter(tmp_path, proxy), **setting)
    result = lazyfs_cli(["mount", str(tmp_path / "mnt"), "--prefix", f"s3://{bucket}/{P}", "--prebaked",
                         str(layer), "--store", str(tmp_path / "store"), "--endpoint-url", proxy.endpoint,
                         "--read-timeout", "2"], env=env, timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    assert "ready" not in result.stdout, result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lazyfs: error: ") and named in last, result.stderr
    assert "Traceback" not in result.stderr
