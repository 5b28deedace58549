"""A local S3 server (moto's standalone server) on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that talks to the local S3 server: no AWS
    settings, profiles, proxies or CA bundles of the caller, test credentials."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "LAZYFS_")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "requests_ca_bundle",
            "ssl_cert_file", "curl_ca_bundle")}
    env.update({
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    })
    env.update(extra or {})
    return env


class MotoServer:
    """`with MotoServer() as s3: s3.endpoint` - killed on exit, whatever happened."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> MotoServer:
        log = open(self._log_path, "wb") if self._log_path else None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, env=clean_env(),
                start_new_session=True)
        finally:
            if log is not None:
                log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within {timeout} s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def s3_client(endpoint: str, checksums: bool = True) -> Any:
    """A boto3 client for the local server (imported here: tests only).
    `checksums=False`: uploads carry no CRC, as from older clients, so the
    object has only its ETag to be checked against."""
    import boto3
    import botocore.config

    when = "when_supported" if checksums else "when_required"
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        region_name=REGION, config=botocore.config.Config(s3={"addressing_style": "path"},
                                                          request_checksum_calculation=when))
