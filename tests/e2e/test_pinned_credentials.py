"""End to end: a pinned mount whose credentials come from a container
endpoint that is slow to fail.  A download asks for credentials within half
of --read-timeout; botocore's requests to the endpoint (each answered 500
after 1.5 s) and its retries take longer.  Before, the first download's line
then blamed the wait ("botocore's credential chain gave none within 2 s (a
credential_process or SSO helper that does not answer?)"), a source the
mount does not even use; now it says the cause the endpoint last gave (its
500, at the start), and that it was asked again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from support.credsource import CredentialEndpoint
from support.mounting import FS, Mounter, lazyfs_cli, on_both_clients, read_unless_refused, wait_until

pytestmark = pytest.mark.fuse
P = "models/m"


@pytest.fixture
def endpoint() -> Iterator[CredentialEndpoint]:
    e = CredentialEndpoint("slow 500")
    yield e
    e.close()


@on_both_clients
def test_a_slow_failing_container_endpoint_is_named_as_the_cause_not_the_wait(
        mount: Mounter, s3: Any, bucket: str, tmp_path: Path, fs: FS, proxy: Any, endpoint: CredentialEndpoint,
        transfer_client: str) -> None:
    data = os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key=f"{P}/a.bin", Body=data)
    lock = tmp_path / "m.lock.json"
    made = lazyfs_cli(["lock", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint, "-o", str(lock)])
    assert made.returncode == 0, made.stderr
    env = mount.env(**endpoint.env("container"))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    m = mount("--lock", str(lock), "--read-timeout", "4", store=tmp_path / "store", env=env, timeout=60)
    assert m.ready_line().startswith("lazyfs: ready PINNED: ")
    with pytest.raises(PermissionError):
        fs.read(m.file(f"{P}/a.bin"), timeout=60)
    said = [ln for ln in m.log().splitlines() if " WARNING " in ln and "a.bin" in ln and "failed" in ln]
    assert said, m.log()[-3000:]
    assert "Received non 200 response 500 from container metadata" in said[0], said[0]
    assert "gave none within" not in said[0] and "credential_process" not in said[0], said[0]
    endpoint.set("up")
    wait_until(lambda: read_unless_refused(fs, m.file(f"{P}/a.bin")) == data, timeout=60,
               what="a read once credentials came")

