"""End to end: either transfer client (the CRT through crtcreds.py) signs
with botocore's credentials; when botocore cannot have them mid-run (a
credential_process that fails, or hangs), a read gets EACCES and the log one
line that names the cause, never a traceback, botocore's own warnings, nor
a stalled network."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from support.mounting import FS, Mounter, on_both_clients

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/m"

# Keys that expire in 20 s: botocore refreshes them on every use (they are
# always within its 10-minute mandatory refresh window), so the helper's
# state counts from the next request on.
_HELPER = """#!/bin/sh
[ -f {d}/fail ] && {{ echo "token service said no" >&2; exit 2; }}
[ -f {d}/hang ] && {{ echo $$ > {d}/hung.pid; exec sleep 300; }}
printf '{{"Version": 1, "AccessKeyId": "testing", "SecretAccessKey": "testing", "SessionToken": "t", '
printf '"Expiration": "%s"}}' "$(date -u -d '+20 seconds' +%Y-%m-%dT%H:%M:%SZ)"
"""


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[Path]:
    """A folder with the credential helper: touch `fail` or `hang` in it.  Ask for
    it before `mount`: torn down after the mount, it kills the last helper hung."""
    folder = tmp_path / "cp"
    folder.mkdir()
    script = folder / "helper.sh"
    script.write_text(_HELPER.format(d=folder))
    script.chmod(0o755)
    yield folder
    pid = folder / "hung.pid"
    if pid.exists():  # the helper we made hang (it is ours: it lives in this test's folder)
        try:
            os.kill(int(pid.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _mount(mount: Mounter, helper: Path, tmp_path: Path, *args: str):
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\ncredential_process = {helper / 'helper.sh'}\n")
    env = mount.env(AWS_CONFIG_FILE=str(config))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]  # the helper's, not the environment's
    return mount(*args, store=tmp_path / "store", env=env)


def _upload(s3, bucket: str, names: list[str]) -> dict[str, bytes]:
    files = {f"{P}/{n}": os.urandom(2 * 1024 * 1024 + 5) for n in names}
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    return files


def _said(log: str, key: str) -> list[str]:
    return [ln for ln in log.splitlines() if (" ERROR " in ln or " WARNING " in ln) and key in ln]


def test_a_failing_credential_helper_is_eacces_with_its_cause(helper: Path, mount: Mounter, s3, bucket: str,
                                                             fs: FS, tmp_path: Path, transfer_client: str):
    """The helper fails mid-run: the reader got EIO, the log 18-27 tracebacks
    (`Exception ignored in: <bound method CrtTransfer._crt_credentials`) and
    `AWS_AUTH_CREDENTIALS_PROVIDER_DELEGATE_FAILURE`, which says nothing of
    credentials."""
    files = _upload(s3, bucket, ["a.bin", "b.bin"])
    (first, one), (second, two) = files.items()
    m = _mount(mount, helper, tmp_path, "--prefix", f"s3://{bucket}/{P}")
    assert fs.read(m.file(first), timeout=60) == one
    (helper / "fail").touch()
    with pytest.raises(OSError) as info:
        fs.read(m.file(second), timeout=60)
    assert info.value.errno == errno.EACCES
    said = _said(m.log(), second)
    assert said and all(" WARNING " in ln and "token service said no" in ln for ln in said), said
    assert "DELEGATE_FAILURE" not in m.log() and "Exception ignored" not in m.log()
    assert " WARNING botocore" not in m.log(), "botocore's failed refresh was said beside lazyfs's line"
    (helper / "fail").unlink()
    assert fs.read(m.file(second), timeout=60) == two, "the next open did not try again"


def test_a_hung_credential_helper_is_said_and_bounded(helper: Path, mount: Mounter, s3, bucket: str,
                                                      fs: FS, tmp_path: Path, transfer_client: str):
    """The helper hangs mid-run: the reader got EIO after --read-deadline and
    the log blamed the network (the CRT: `stalled: no byte for 20 s`; boto3:
    `no data for bytes 0-8 within 60 s`).  Now a signing (boto3's: a request)
    waits half of --read-timeout for botocore, and says so."""
    files = _upload(s3, bucket, ["c.bin", "d.bin"])
    (first, one), (second, two) = files.items()
    m = _mount(mount, helper, tmp_path, "--prefix", f"s3://{bucket}/{P}", "--read-timeout", "4")
    assert fs.read(m.file(first), timeout=60) == one
    (helper / "hang").touch()
    with pytest.raises(OSError) as info:
        fs.read(m.file(second), timeout=60)
    assert info.value.errno == errno.EACCES
    said = _said(m.log(), second)
    assert said and all(" WARNING " in ln and "credential chain gave none within 2 s" in ln for ln in said), said
    assert "stalled" not in m.log() and "no data for" not in m.log()
    # Once the hung helper is gone (botocore held its refresh lock meanwhile), reads work again.
    (helper / "hang").unlink()
    os.kill(int((helper / "hung.pid").read_text()), signal.SIGKILL)
    # A signing already waiting for the killed helper's refresh gets its failure: the read after it works.
    for _ in range(3):
        try:
            assert fs.read(m.file(second), timeout=60) == two
            break
        except PermissionError:
            time.sleep(0.5)
    else:
        raise AssertionError("reads still refused once the hung helper was gone")
