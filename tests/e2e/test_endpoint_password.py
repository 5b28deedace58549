"""End to end: an endpoint with a password in it (`http://admin:PASSWORD@host`,
from --endpoint-url, AWS_ENDPOINT_URL or a profile's endpoint_url).  Before,
lazyfs showed the password in its exit line ("cannot reach the object store
at http://admin:...@..."), the offline start's WARNING, `doctor`'s endpoint
line and `status`'s summary.  Now the endpoint is shown with its password
masked (remote.Remote.endpoint: `http://admin:<redacted>@host`), and every
line that leaves the process masks a URL's password (redact.urls): it shows
nowhere in stdout, stderr, the log (either format, at debug, botocore's words
quoting a request's URL included), the stats file, states.json, `status`
(and its JSON), nor in a lock or the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from support.mounting import FS, Mounter, lazyfs_cli
from support.proxy import Fault, S3Proxy
from support.s3server import clean_env, free_port

pytestmark = pytest.mark.fuse

P = "models/m"
PASSWORD = "S3cretPW9x"
SHOWN = "admin:<redacted>@127.0.0.1:"
# An offline mount's tries of the listing, and a read of a file it cannot fetch.
OFFLINE_LINES = ("listing failed", "cannot reach the object store")


def with_password(endpoint: str) -> str:
    return endpoint.replace("http://", f"http://admin:{PASSWORD}@", 1)


def no_password(what: str, text: str) -> None:
    assert PASSWORD not in text, f"{what} shows the endpoint's password:\n{text[-3000:]}"


def files_under(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize(("transfer_client", "log_format"), [("boto3", "text"), ("boto3", "json"), ("crt", "text")],
                         indirect=["transfer_client"])
def test_a_mount_whose_endpoint_has_a_password_shows_it_nowhere(mount: Mounter, proxy: S3Proxy, s3: Any,
                                                                bucket: str, fs: FS, tmp_path: Path,
                                                                log_format: str, transfer_client: str) -> None:
    data = b"w" * 300_000
    s3.put_object(Bucket=bucket, Key=f"{P}/w.bin", Body=data)
    # A GET answered by a closed connection: botocore's words for it quote the request's URL (a retry's line).
    proxy.add(Fault("drop", key=f"{P}/w.bin", times=1))
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--log-format", log_format, store=store,
              endpoint=with_password(proxy.endpoint))
    assert fs.read(m.file(f"{P}/w.bin")) == data
    stats = fs.read(m.path / ".lazyfs" / "stats.json").decode()
    states = fs.read(m.path / ".lazyfs" / "states.json").decode()
    said = [lazyfs_cli(["status", str(m.path), *form]) for form in ([], ["--json"])]
    m.stop()
    assert all(r.returncode == 0 for r in said), [r.stdout + r.stderr for r in said]
    for what, text in [("stats.json", stats), ("states.json", states), ("the ready line", m.ready_line()),
                       ("the log", m.log()), ("status", said[0].stdout + said[0].stderr),
                       ("status --json", said[1].stdout + said[1].stderr), ("the store", files_under(store))]:
        no_password(what, text)
    assert "DEBUG" in m.log() or '"level": "debug"' in m.log()  # (at debug: every line lazyfs has)
    if transfer_client == "boto3":  # its retry's line, botocore's words with the URL: masked
        assert SHOWN in m.log(), m.log()


@pytest.mark.log_errors(*OFFLINE_LINES)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_unreachable_endpoint_with_a_password_is_shown_masked(mount: Mounter, proxy: S3Proxy, s3: Any,
                                                                 bucket: str, fs: FS, tmp_path: Path,
                                                                 log_format: str) -> None:
    s3.put_object(Bucket=bucket, Key=f"{P}/a.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key=f"{P}/b.json", Body=b"[]")
    logs = ["--log-level", "debug", "--log-format", log_format]
    good = mount.env(AWS_ENDPOINT_URL=with_password(proxy.endpoint))
    store, lock = tmp_path / "store", tmp_path / "lock.json"
    for command in (["lock", "-o", str(lock)], ["bake", "--to", str(store)]):
        done = lazyfs_cli([*command, "--prefix", f"s3://{bucket}/{P}", *logs], env=good)
        assert done.returncode == 0, done.stdout + done.stderr
        no_password(f"lazyfs {command[0]}", done.stdout + done.stderr)
    no_password("the lock", lock.read_text())
    (store / P / "b.json").unlink()
    bad = mount.env(AWS_ENDPOINT_URL=with_password(f"http://127.0.0.1:{free_port()}"))
    (tmp_path / "mnt").mkdir()
    failed = lazyfs_cli(["mount", str(tmp_path / "mnt"), "--prefix", f"s3://{bucket}/{P}", "--store",
                         str(tmp_path / "empty"), *logs], env=bad)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("lazyfs: error: cannot reach the object store at http://" + SHOWN), failed.stderr
    doctor = lazyfs_cli(["doctor", "--prefix", f"s3://{bucket}/{P}", *logs], env=bad)
    assert f"FAIL  endpoint: http://{SHOWN}" in doctor.stdout, doctor.stdout + doctor.stderr
    said = [lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--store", str(store), *form, *logs], env=bad)
            for form in ([], ["--json"])]
    assert f"object store unreachable (cannot reach the object store at http://{SHOWN}" in said[0].stdout, said[0]
    assert SHOWN in json.loads(said[1].stdout)["source"], said[1].stdout
    m = mount("--prefix", f"s3://{bucket}/{P}", "--log-format", log_format, store=store, endpoint="", env=bad)
    assert m.ready_line().startswith("lazyfs: ready OFFLINE: "), m.ready_line()
    assert fs.read(m.file(f"{P}/a.json")) == b"{}"
    stats = fs.read(m.path / ".lazyfs" / "stats.json").decode()
    m.stop()
    offline = [ln for ln in m.log().splitlines() if "starting offline" in ln]
    assert len(offline) == 1 and SHOWN in offline[0], offline
    for what, text in [("a failed mount's output", failed.stdout + failed.stderr),
                       ("doctor", doctor.stdout + doctor.stderr), ("status", said[0].stdout + said[0].stderr),
                       ("status --json", said[1].stdout + said[1].stderr), ("the offline mount's log", m.log()),
                       ("stats.json", stats), ("the store", files_under(store))]:
        no_password(what, text)


def test_a_profiles_endpoint_with_a_password_is_shown_masked(bucket: str, tmp_path: Path) -> None:
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\nendpoint_url = {with_password(f'http://127.0.0.1:{free_port()}')}\n")
    env = clean_env({"AWS_CONFIG_FILE": str(config)})
    doctor = lazyfs_cli(["doctor", "--prefix", f"s3://{bucket}/{P}", "--log-level", "debug"], env=env)
    assert f"FAIL  endpoint: http://{SHOWN}" in doctor.stdout, doctor.stdout + doctor.stderr
    no_password("doctor", doctor.stdout + doctor.stderr)
