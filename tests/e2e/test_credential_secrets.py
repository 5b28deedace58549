"""End to end: a `credential_process` that fails prints whatever it likes to
stderr, and botocore puts all of it in its error.  Helpers that echo the
keys they were given (or dump the JSON they would have printed) are common;
before, lazyfs copied that text into its WARNING line, the exit-1 line,
`lazyfs status`, the mount's stats and `doctor`.  Now every credential error
lazyfs says is masked (redact.py) and its helper's part capped, so none of
the secrets shows anywhere, in either log format (a traceback's text too),
while the helper's reason ("token expired") still does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from support.mounting import FS, Mounter, lazyfs_cli, wait_until
from support.proxy import S3Proxy

pytestmark = pytest.mark.fuse

P = "models/m"
KEY_ID = "AKIAZ7FAKEKEYLEAK0QX"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY9LEAKEDKEY"
TOKEN = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJsYXp5ZnMtbGVhayIsImV4cCI6MTcwMDAwMDAwMH0."
         "S1gnatur3LeakedByAHelperX9kQ2mZ7pL")
# Short ones, after a plain space and after `password=` (each within the part of its stderr lazyfs keeps).
PASSWORD, PASSWORD2 = "hunter2x9", "pa55word"
SECRETS = (KEY_ID, SECRET, TOKEN, PASSWORD, PASSWORD2)
REASON = "token expired, run aws sso login"
# A helper's usual ways of saying too much: prose, key=value, and its JSON.
_HELPER = f"""#!/bin/sh
echo "credential helper: {REASON}" >&2
echo "vault login: password {PASSWORD} refused, password={PASSWORD2}" >&2
echo "failed for key {KEY_ID} secret {SECRET}" >&2
echo "aws_secret_access_key={SECRET} aws_session_token={TOKEN}" >&2
echo '{{"Version": 1, "AccessKeyId": "{KEY_ID}", "SecretAccessKey": "{SECRET}", "SessionToken": "{TOKEN}"}}' >&2
exit 1
"""
# The offline mount's tries of the listing while credentials cannot be had (WARNINGs).
TRIES = ("listing failed",)


def test_the_fake_secrets_are_what_a_helper_would_leak() -> None:
    assert len(SECRET) == 40 and len(KEY_ID) == 20 and TOKEN.count(".") == 2


@pytest.fixture
def leaky_env(mount: Mounter, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A clean environment (no AWS_ACCESS_KEY_ID) whose default profile runs the leaky helper."""
    folder = tmp_path / "helper"
    folder.mkdir()
    script = folder / "helper.sh"
    script.write_text(_HELPER)
    script.chmod(0o755)
    config = folder / "aws-config"
    config.write_text(f"[default]\ncredential_process = {script}\n")
    env = mount.env(AWS_CONFIG_FILE=str(config))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    yield env


def no_secret_in(what: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{what} holds {secret!r}:\n{text[-3000:]}"
    # Nor a recognisable piece of one (the token's signature, the secret's halves).
    for piece in (SECRET[:20], SECRET[20:], TOKEN.split(".")[2], KEY_ID[4:]):
        assert piece not in text, f"{what} holds {piece!r} (of a secret):\n{text[-3000:]}"


def files_under(folder: Path) -> dict[str, str]:
    return {str(p): p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file()}


def layer_with_a_file(tmp_path: Path) -> Path:
    layer = tmp_path / "layer"
    (layer / P).mkdir(parents=True)
    (layer / P / "a.bin").write_bytes(b"a" * 1000)
    return layer


@pytest.mark.log_errors(*TRIES)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_leaky_helper_leaks_nothing_from_an_offline_start(mount: Mounter, leaky_env: dict[str, str],
                                                            bucket: str, tmp_path: Path, fs: FS,
                                                            log_format: str) -> None:
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--prebaked", str(layer_with_a_file(tmp_path)),
              "--read-timeout", "2", "--log-format", log_format, store=store, env=leaky_env, timeout=60)
    assert m.ready_line().startswith("lazyfs: ready OFFLINE: "), m.ready_line()
    said = [ln for ln in m.log().splitlines() if "starting offline" in ln]
    assert len(said) == 1 and REASON in said[0] and "AKIA****" in said[0], said
    assert fs.read(m.file(f"{P}/a.bin")) == b"a" * 1000
    # A try of the listing after the start runs the chain again (LateCredentials): its line too.
    wait_until(lambda: "listing failed" in m.log(), timeout=60, what="a try of the listing")
    status = lazyfs_cli(["status", str(m.path)], env=leaky_env)
    assert "offline" in status.stdout and REASON in status.stdout, status.stdout + status.stderr
    no_secret_in("lazyfs status", status.stdout + status.stderr)
    stats = fs.read(m.path / ".lazyfs" / "stats.json").decode()
    assert REASON in stats, stats
    no_secret_in("the mount's stats.json", stats)
    for path, text in files_under(store / ".lazyfs").items():
        no_secret_in(path, text)
    m.stop()
    no_secret_in("the mount's log", m.log())
    no_secret_in("the mount's stdout", "\n".join(m.process.stdout_lines))
    for line in m.log().splitlines():
        assert len(line) < 1500, f"a line of {len(line)} characters: {line[:300]}..."


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_leaky_helper_leaks_nothing_from_a_start_that_fails_or_doctor(fuse_ok: None, leaky_env: dict[str, str],
                                                                        proxy: S3Proxy, bucket: str,
                                                                        tmp_path: Path, log_format: str) -> None:
    (tmp_path / "mnt").mkdir()
    store = tmp_path / "store"
    logs = ["--log-level", "debug", "--log-format", log_format]
    result = lazyfs_cli(["mount", str(tmp_path / "mnt"), "--prefix", f"s3://{bucket}/{P}", "--store", str(store),
                         "--endpoint-url", proxy.endpoint, "--read-timeout", "2", *logs], env=leaky_env, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lazyfs: error: ") and REASON in last, result.stderr
    no_secret_in("a failed mount's output", result.stdout + result.stderr)
    for command in (["status", str(tmp_path / "mnt")], ["bake", "--to", str(tmp_path / "baked")],
                    ["lock", "--output", str(tmp_path / "lock.json")]):
        other = lazyfs_cli([*command, "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint, *logs],
                           env=leaky_env, timeout=60)
        assert other.returncode == 1 and REASON in other.stderr, other.stdout + other.stderr
        no_secret_in(f"lazyfs {command[0]}", other.stdout + other.stderr)
    if store.exists():
        for path, text in files_under(store).items():
            no_secret_in(path, text)
    doctor = lazyfs_cli(["doctor", "--prefix", f"s3://{bucket}/{P}", "--store", str(tmp_path / "store2"),
                         "--endpoint-url", proxy.endpoint, str(tmp_path / "mnt"), *logs], env=leaky_env, timeout=60)
    said = [ln for ln in doctor.stdout.splitlines() if ln.startswith("FAIL  credentials")]
    assert len(said) == 1 and REASON in said[0], doctor.stdout + doctor.stderr
    no_secret_in("lazyfs doctor", doctor.stdout + doctor.stderr)
    assert os.path.isdir(tmp_path / "mnt")


# A helper whose words botocore cannot read: stderr that is not UTF-8 (on its failure), or
# stdout that is not JSON (on its success).  Before, a traceback (the first) or an internal error.
_GARBLED = {
    "stderr-not-utf8": "#!/bin/sh\nprintf 'helper failed: \\377\\376\\200\\n' >&2\nexit 1\n",
    "stdout-not-json": "#!/bin/sh\necho 'this is not JSON'\nexit 0\n",
}
# What the line says of each: which source, and what was wrong with its words (not only "Expecting value").
_GARBLED_SAID = {"stderr-not-utf8": "a credential source's output is not UTF-8 text",
                 "stdout-not-json": "a credential source's answer is not JSON (a credential_process prints its keys "
                                    "as JSON)"}


@pytest.mark.log_errors(*TRIES)
@pytest.mark.parametrize("kind", sorted(_GARBLED))
def test_a_helper_whose_output_botocore_cannot_read_is_a_credential_source_failing(
        mount: Mounter, bucket: str, tmp_path: Path, fs: FS, kind: str) -> None:
    script = tmp_path / "helper.sh"
    script.write_text(_GARBLED[kind])
    script.chmod(0o755)
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\ncredential_process = {script}\n")
    env = mount.env(AWS_CONFIG_FILE=str(config))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    (tmp_path / "mnt").mkdir()
    failed = lazyfs_cli(["mount", str(tmp_path / "mnt"), "--prefix", f"s3://{bucket}/{P}",
                         "--store", str(tmp_path / "empty"), "--endpoint-url", mount.proxy.endpoint,
                         "--read-timeout", "2"], env=env, timeout=60)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr and "internal error" not in failed.stderr, failed.stderr
    [last] = failed.stderr.strip().splitlines()[-1:]
    assert last.startswith("lazyfs: error: AWS credentials unavailable: "), failed.stderr
    assert _GARBLED_SAID[kind] in last, last
    m = mount("--prefix", f"s3://{bucket}/{P}", "--prebaked", str(layer_with_a_file(tmp_path)),
              "--read-timeout", "2", store=tmp_path / "store", env=env, timeout=60)
    assert m.ready_line().startswith("lazyfs: ready OFFLINE: "), m.ready_line()
    assert fs.read(m.file(f"{P}/a.bin")) == b"a" * 1000
    assert "Traceback" not in m.log()
