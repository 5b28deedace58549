"""End to end: a container credentials endpoint that answers keys whose
Expiration has passed (its clock or its rotation broken).  botocore refreshes
them at once, finds them still expired, and raises a bare RuntimeError
("Credentials were refreshed, but the refreshed credentials are still
expired"); before, every command ended in `lazyfs: internal error:
RuntimeError: ...`.  Now it is a credential source failing like any other:
one line naming the cause, exit 1 (doctor: its FAIL line), and a mount with
files on disk starts offline from them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from support.credsource import CredentialEndpoint
from support.mounting import FS, Mounter, lazyfs_cli
from support.proxy import S3Proxy
from support.s3server import clean_env

P = "models/m"
CAUSE = "expired"


@pytest.fixture
def expired() -> Iterator[CredentialEndpoint]:
    e = CredentialEndpoint("expired")
    yield e
    e.close()


def _env(endpoint: CredentialEndpoint) -> dict[str, str]:
    env = clean_env(endpoint.env("container"))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    return env


@pytest.mark.parametrize("command", ["mount", "lock", "bake", "status", "doctor"])
def test_expired_container_credentials_are_a_failing_source(command: str, expired: CredentialEndpoint,
                                                            fuse_ok: None, proxy: S3Proxy, bucket: str,
                                                            tmp_path: Path) -> None:
    args = {"mount": ["mount", str(tmp_path / "mnt"), "--store", str(tmp_path / "store")],
            "lock": ["lock", "--output", str(tmp_path / "l.json")], "bake": ["bake", "--to", str(tmp_path / "b")],
            "status": ["status", str(tmp_path)], "doctor": ["doctor", str(tmp_path / "mnt")]}[command]
    (tmp_path / "mnt").mkdir()
    timeout = ["--read-timeout", "2"] if command in ("mount", "bake") else []
    result = lazyfs_cli([*args, "--prefix", f"s3://{bucket}/{P}/", "--endpoint-url", proxy.endpoint, *timeout],
                        env=_env(expired), timeout=90)
    out = result.stdout + result.stderr
    assert "internal error" not in out and "Traceback" not in out and "RuntimeError" not in out, out
    assert result.returncode == 1, out
    if command == "doctor":
        said = [ln for ln in result.stdout.splitlines() if ln.startswith("FAIL  credentials")]
        assert len(said) == 1 and CAUSE in said[0] and "container" in said[0], result.stdout
        return
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lazyfs: error: ") and "AWS credentials unavailable: " in last, result.stderr
    assert CAUSE in last and "container" in last, last
    if command == "mount":  # as for any source failing, with nothing on disk
        assert "has nothing to serve" in last, last
    assert [r for r in proxy.requests() if r["method"] != "POST"] == [], "a request reached the object store"


@pytest.mark.fuse
@pytest.mark.log_errors("listing failed")
def test_a_mount_with_files_on_disk_starts_offline_on_expired_container_credentials(
        expired: CredentialEndpoint, mount: Mounter, bucket: str, tmp_path: Path, fs: FS) -> None:
    layer = tmp_path / "layer"
    (layer / P).mkdir(parents=True)
    (layer / P / "a.bin").write_bytes(b"a" * 1000)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--prebaked", str(layer), "--read-timeout", "2",
              store=tmp_path / "store", env=_env(expired), timeout=60)
    assert m.ready_line().startswith("lazyfs: ready OFFLINE: "), m.ready_line()
    said = [ln for ln in m.log().splitlines() if "starting offline" in ln]
    assert len(said) == 1 and CAUSE in said[0] and "AWS credentials unavailable" in said[0], said
    assert fs.read(m.file(f"{P}/a.bin")) == b"a" * 1000
    assert "Traceback" not in m.log() and "RuntimeError" not in m.log()
