"""Credentials from sources other than static keys: an AssumeRole profile and
web identity (IRSA), each resolved through moto's STS, on both transfer
clients; and credential sources that fail, hang or are misconfigured, which
end in one line and a documented exit code, never a traceback."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from support.mounting import Mounter, lazyfs_cli, on_both_clients
from support.proxy import S3Proxy
from support.s3server import MotoServer, clean_env

DATA = os.urandom(300_000)


def _no_static_keys(extra: dict[str, str]) -> dict[str, str]:
    env = clean_env(extra)
    env.pop("AWS_ACCESS_KEY_ID")
    env.pop("AWS_SECRET_ACCESS_KEY")
    return env


def _role_profile(tmp_path: Path, moto: MotoServer) -> dict[str, str]:
    """A scratch ~/.aws/config: profile `role` assumes a role with the keys of profile `src`."""
    config = tmp_path / "aws-config"
    config.write_text("[profile src]\naws_access_key_id = AKIASOURCEPROFILE01\naws_secret_access_key = src\n\n"
                      "[profile role]\nrole_arn = arn:aws:iam::123456789012:role/lazyfs-reader\n"
                      "source_profile = src\nrole_session_name = lazyfs-test\n")
    return _no_static_keys({"AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "role",
                            "AWS_ENDPOINT_URL_STS": moto.endpoint})


def _web_identity(tmp_path: Path, moto: MotoServer) -> dict[str, str]:
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJsYXp5ZnMifQ.c2ln")
    return _no_static_keys({"AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
                            "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/lazyfs-irsa",
                            "AWS_ROLE_SESSION_NAME": "lazyfs-test", "AWS_ENDPOINT_URL_STS": moto.endpoint})


@on_both_clients
@pytest.mark.parametrize("source", ["assume-role profile", "web identity"])
def test_a_role_s_credentials_read_files(source: str, mount: Mounter, moto: MotoServer, proxy: S3Proxy,
                                          s3: Any, bucket: str, tmp_path: Path, fs: Any) -> None:
    s3.put_object(Bucket=bucket, Key="m/model.bin", Body=DATA)
    env = (_role_profile if source == "assume-role profile" else _web_identity)(tmp_path, moto)
    m = mount("--prefix", f"s3://{bucket}/m/", env=env)
    assert fs.read(m.file("m/model.bin")) == DATA
    gets = proxy.requests("GET", key="m/model.bin")
    assert gets, "no GET reached the object store"
    # moto's STS hands out temporary keys (ASIA...): every request is signed
    # with the role's, none with the source profile's or no keys at all.
    signed_with = {r["access_key"] for r in proxy.requests()}
    assert all(k.startswith("ASIA") for k in signed_with), signed_with


@pytest.mark.parametrize("command", ["lock", "bake", "status", "doctor"])
def test_an_assume_role_profile_works_for_the_other_commands(command: str, moto: MotoServer, proxy: S3Proxy,
                                                             s3: Any, bucket: str, tmp_path: Path) -> None:
    s3.put_object(Bucket=bucket, Key="m/model.bin", Body=DATA)
    args = {"lock": ["lock", "--output", str(tmp_path / "m.lock.json")],
            "bake": ["bake", "--to", str(tmp_path / "baked")],
            "status": ["status", str(tmp_path)],
            "doctor": ["doctor"]}[command]
    result = lazyfs_cli([*args, "--prefix", f"s3://{bucket}/m/", "--endpoint-url", proxy.endpoint],
                        env=_role_profile(tmp_path, moto), timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    assert "sts" not in result.stderr.lower(), result.stderr
    if command == "doctor":
        # Other checks (FUSE, the kernel) may fail on a test machine: only credentials and listing matter.
        assert "FAIL  credentials" not in result.stdout and "FAIL  bucket" not in result.stdout, result.stdout
        assert "assume-role" in result.stdout, result.stdout
    else:
        assert result.returncode == 0, result.stderr


def _profile(tmp_path: Path, body: str, **extra: str) -> dict[str, str]:
    config = tmp_path / "aws-config"
    config.write_text(f"[profile broken]\n{body}\n")
    return _no_static_keys({"AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "broken", **extra})


def test_a_hung_credential_process_ends_the_start_with_one_line(fuse_ok: None, proxy: S3Proxy, bucket: str,
                                                                tmp_path: Path) -> None:
    """credential_process that never answers: a line after a second saying
    what the start waits for, then exit 1 after 5 s plus --read-timeout, and
    the helper killed, not left behind."""
    # A helper script that starts a child of its own, as a shell script does:
    # both must go.  The odd fraction names them in /proc (GNU sleep takes it).
    marker = f"3600.{os.getpid()}{time.monotonic_ns() % 10**6}"
    helper = tmp_path / "credential-helper"
    helper.write_text(f"#!/bin/sh\nsleep {marker}\necho never\n")
    helper.chmod(0o755)
    env = _profile(tmp_path, f"credential_process = {helper}")
    (tmp_path / "mnt").mkdir()
    started = time.monotonic()
    result = lazyfs_cli(["mount", str(tmp_path / "mnt"), "--prefix", f"s3://{bucket}/m/", "--endpoint-url",
                         proxy.endpoint, "--read-timeout", "2"], env=env, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert "waiting for AWS credentials" in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lazyfs: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert took < 30, took  # 5 s + 2 s of --read-timeout, not the 3600 s the helper sleeps
    left = wait_until_none(lambda: [p for p in os.listdir("/proc")
                                    if p.isdigit() and (marker in _cmdline(p) or str(helper) in _cmdline(p))])
    assert not left, "the hung credential_process was left running"


def wait_until_none(find: Any, timeout: float = 5.0) -> Any:
    """`find()` until it finds nothing (a killed process is gone a moment later), or its last finding."""
    deadline = time.monotonic() + timeout
    while (found := find()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


MISCONFIGURED = {
    "no such profile": ({"AWS_PROFILE": "nosuchprofile", "AWS_CONFIG_FILE": os.devnull}, 2, "nosuchprofile"),
    "a failing credential_process": ("credential_process = /bin/sh -c 'echo token service said no >&2; exit 3'",
                                     1, "token service said no"),
    "a container endpoint not listening": ({"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:9/creds"}, 1,
                                           "container"),
    "a missing container token file": ({"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:9/creds",
                                        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": "/nonexistent/token"}, 1,
                                       "/nonexistent/token"),
    "a key id without a secret": ({"AWS_ACCESS_KEY_ID": "AKIAONLYTHEKEY00001"}, 1, "AWS_SECRET_ACCESS_KEY"),
}


@pytest.mark.parametrize("command", ["mount", "lock", "bake", "status", "doctor"])
@pytest.mark.parametrize("case", list(MISCONFIGURED))
def test_misconfigured_credentials_are_one_line_and_an_exit_code(case: str, command: str, proxy: S3Proxy,
                                                                 bucket: str, tmp_path: Path) -> None:
    setting, code, named = MISCONFIGURED[case]
    env = _profile(tmp_path, setting) if isinstance(setting, str) else _no_static_keys(setting)
    if case == "a key id without a secret":
        env["AWS_ACCESS_KEY_ID"] = "AKIAONLYTHEKEY00001"
    args = {"mount": ["mount", str(tmp_path / "mnt")], "lock": ["lock", "--output", str(tmp_path / "l.json")],
            "bake": ["bake", "--to", str(tmp_path / "baked")], "status": ["status", str(tmp_path)],
            "doctor": ["doctor"]}[command]
    (tmp_path / "mnt").mkdir()
    timeout = ["--read-timeout", "2"] if command in ("mount", "bake") else []
    result = lazyfs_cli([*args, "--prefix", f"s3://{bucket}/m/", "--endpoint-url", proxy.endpoint, *timeout],
                        env=env, timeout=90)
    assert "Traceback" not in result.stderr, result.stderr
    assert "internal error" not in result.stderr, result.stderr
    if command == "doctor":
        assert result.returncode == 1, result.stdout + result.stderr
        assert "FAIL  credentials" in result.stdout and named in result.stdout, result.stdout
        return
    if command == "status":  # a plain folder: S3 is asked, and its failure is the command's
        code = code if code == 2 else 1
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert lines and lines[-1].startswith("lazyfs: error: ") and named in lines[-1], result.stderr
    assert "\\n" not in lines[-1], lines[-1]


class _ContainerEndpoint:
    """AWS_CONTAINER_CREDENTIALS_FULL_URI: keys valid a minute (inside
    botocore's mandatory refresh window, so every request asks again); 500
    once the flag file exists."""

    def __init__(self, flag: Path) -> None:
        import http.server
        import threading

        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if flag.exists():
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(endpoint.keys()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/creds"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def keys() -> dict[str, str]:
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
        return {"AccessKeyId": "ASIACONTAINER000001", "SecretAccessKey": "s", "Token": "t", "Expiration": expires}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("source", ["credential_process", "container endpoint"])
def test_a_credential_source_failing_mid_run_is_eacces_and_one_warning(source: str, mount: Mounter, s3: Any,
                                                                       bucket: str, tmp_path: Path, fs: Any) -> None:
    """Keys that expire soon, then the source fails (a revoked token): the
    next download's open is EACCES, with one WARNING naming the cause; no
    traceback (botocore's own warning keeps its message) and no ERROR."""
    s3.put_object(Bucket=bucket, Key="m/a.bin", Body=DATA)
    s3.put_object(Bucket=bucket, Key="m/b.bin", Body=DATA[::-1])
    flag = tmp_path / "revoked"
    container = None
    if source == "credential_process":
        helper = tmp_path / "credential-helper"
        helper.write_text(f"#!/bin/sh\n[ -f {flag} ] && {{ echo 'sts: token revoked' >&2; exit 2; }}\n"
                          "echo '{\"Version\": 1, \"AccessKeyId\": \"ASIAPROCESS00000001\", \"SecretAccessKey\": "
                          "\"s\", \"SessionToken\": \"t\", \"Expiration\": \"'$(date -u -d '+60 seconds' "
                          "+%Y-%m-%dT%H:%M:%SZ)'\"}'\n")
        helper.chmod(0o755)
        env = _profile(tmp_path, f"credential_process = {helper}")
    else:
        container = _ContainerEndpoint(flag)
        env = _no_static_keys({"AWS_CONTAINER_CREDENTIALS_FULL_URI": container.url})
    try:
        m = mount("--prefix", f"s3://{bucket}/m/", "--transfer-client", "boto3", "--retries", "0", env=env)
        assert fs.read(m.file("m/a.bin")) == DATA
        flag.touch()
        with pytest.raises(PermissionError):
            fs.read(m.file("m/b.bin"))
        log = m.log()
        assert "Traceback" not in log
        warnings = [ln for ln in log.splitlines() if " WARNING lazyfs." in ln and "m/b.bin" in ln]
        assert len(warnings) == 1, log[-3000:]
        assert "credentials" in warnings[0], warnings[0]
    finally:
        if container is not None:
            container.close()
