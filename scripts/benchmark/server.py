"""The benchmark's S3 endpoint: our s3rver wrapper on loopback or in a
namespace (benchnet.WanLink), or a real S3/MinIO given by --endpoint-url; the
server's traffic counters; clean environments for every child process.

moto's server answers a ranged GET in time proportional to the whole object,
so it cannot serve a large-object benchmark; s3rver reads only the range from
disk.  s3rver_wrapper.js (beside this file) fixes its listing, enforces
If-Match and counts requests and bytes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.net import WanLink
from support.s3server import clean_env, free_port

WRAPPER_JS = Path(__file__).with_name("s3rver_wrapper.js")
S3RVER_VERSION = "3.7.1"
# s3rver's one built-in account.
S3RVER_KEY = "S3RVER"
KINDS = ("get_range", "get", "head", "list", "write", "other")
KIND_LABELS = {"get_range": "ranged GET", "get": "GET", "head": "HEAD", "list": "LIST",
               "write": "write", "other": "other"}


@dataclass(frozen=True)
class Endpoint:
    url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str
    session_token: str = ""
    # Which server the numbers come from, for the report.
    description: str = ""

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A clean environment for a child that talks to this endpoint: none of
        the caller's AWS_*, RCLONE_*, proxy or CA-bundle settings (rclone fails
        on the CA-bundle variables here), only these credentials."""
        creds = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                 "AWS_DEFAULT_REGION": self.region, "AWS_REGION": self.region}
        if self.session_token:
            creds["AWS_SESSION_TOKEN"] = self.session_token
        env = {k: v for k, v in clean_env(creds).items() if not k.startswith("RCLONE_")}
        env.update(extra or {})
        return env


def remote_endpoint(url: str, bucket: str) -> Endpoint:
    """A real S3 or MinIO; credentials from the caller's environment."""
    env = os.environ
    key, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
    if not key or not secret:
        raise SystemExit("--endpoint-url needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    return Endpoint(url=url, bucket=bucket, access_key=key, secret_key=secret, region=region,
                    session_token=env.get("AWS_SESSION_TOKEN", ""),
                    description=f"{url} (remote endpoint: no server-side counters)")


def s3_client(ep: Endpoint, pool: int = 32) -> Any:
    """A boto3 client for uploads and checks.  s3rver does not understand the
    newer default request checksums, hence `when_required`."""
    import boto3
    import botocore.config

    cfg = botocore.config.Config(s3={"addressing_style": "path"}, max_pool_connections=pool,
                                 retries={"mode": "standard", "max_attempts": 5},
                                 request_checksum_calculation="when_required",
                                 response_checksum_validation="when_required")
    return boto3.session.Session().client(
        "s3", endpoint_url=ep.url, aws_access_key_id=ep.access_key, aws_secret_access_key=ep.secret_key,
        aws_session_token=ep.session_token or None, region_name=ep.region, config=cfg)


@dataclass
class Traffic:
    """Server counters at one moment, or the difference of two moments."""

    kinds: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (requests, bytes)
    keys: dict[str, tuple[int, int]] = field(default_factory=dict)  # GETs by key
    link_bytes: int | None = None  # wan mode: bytes on the veth, frames included

    @classmethod
    def parse(cls, raw: dict[str, Any], link_bytes: int | None) -> Traffic:
        kinds = {k: (int(v["requests"]), int(v["bytes"])) for k, v in raw.get("kinds", {}).items()}
        keys = {k: (int(v["requests"]), int(v["bytes"])) for k, v in raw.get("keys", {}).items()}
        return cls(kinds, keys, link_bytes)

    def minus(self, before: Traffic) -> Traffic:
        def sub(a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
            out = {}
            for k, (n, nbytes) in a.items():
                n0, b0 = b.get(k, (0, 0))
                if n - n0 or nbytes - b0:
                    out[k] = (n - n0, nbytes - b0)
            return out

        link = None
        if self.link_bytes is not None and before.link_bytes is not None:
            link = self.link_bytes - before.link_bytes
        return Traffic(sub(self.kinds, before.kinds), sub(self.keys, before.keys), link)

    def requests(self, *kinds: str) -> int:
        return sum(n for k, (n, _) in self.kinds.items() if not kinds or k in kinds)

    def bytes(self, *kinds: str) -> int:
        return sum(b for k, (_, b) in self.kinds.items() if not kinds or k in kinds)

    def key_bytes(self, key: str) -> int:
        return self.keys.get(key, (0, 0))[1]

    def summary(self) -> str:
        """"2 LIST, 128 ranged GET, 1 HEAD"."""
        parts = [f"{self.kinds[k][0]} {KIND_LABELS[k]}" for k in KINDS if self.kinds.get(k, (0, 0))[0]]
        return ", ".join(parts) or "none"


class LocalS3:
    """Our s3rver wrapper as a child process, on loopback or inside `link`."""

    def __init__(self, node_modules: Path, store_dir: Path, workdir: Path, bucket: str,
                 link: WanLink | None = None, delay_ms: float = 0.0, checksums: Path | None = None) -> None:
        self.node_modules = node_modules
        self.checksums = checksums  # data.object_checksums' file: the server answers them as S3 does
        self.store_dir = store_dir
        self.bucket = bucket
        self.link = link
        self.delay_ms = delay_ms
        self.sock = workdir / "s3stats.sock"
        self.log_path = workdir / "logs" / "s3rver.log"
        self.host = link.ns_ip if link else "127.0.0.1"
        # Inside our own namespace any port is free.
        self.port = 9000 if link else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> Endpoint:
        where = (f"in a network namespace over veth, {self.delay_ms:g} ms per request, "
                 f"{self.link.rate_mbit:g} Mbit/s per connection" if self.link else "on loopback")
        return Endpoint(url=f"http://{self.host}:{self.port}", bucket=self.bucket, access_key=S3RVER_KEY,
                        secret_key=S3RVER_KEY, region="us-east-1",
                        description=f"s3rver {S3RVER_VERSION} on Node.js {_node_version()} through "
                        f"scripts/benchmark/s3rver_wrapper.js (sorted listing, If-Match enforced"
                        f"{', a CRC per object as S3 keeps' if self.checksums else ''}), {where}")

    def start(self, timeout: float = 30.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        prefix = self.link.exec_prefix() if self.link else []
        argv = [*prefix, "node", "--openssl-legacy-provider", str(WRAPPER_JS), "--dir", str(self.store_dir),
                "--address", self.host, "--port", str(self.port), "--stats-socket", str(self.sock),
                "--bucket", self.bucket, "--delay-ms", f"{self.delay_ms:g}",
                *(["--checksums", str(self.checksums)] if self.checksums else [])]
        env = self.endpoint.env({"NODE_PATH": str(self.node_modules)})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the S3 server exited ({self.proc.returncode}): {_tail(self.log_path)}")
            try:
                self.raw_stats()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the S3 server did not come up within {timeout:g} s: {_tail(self.log_path)}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def raw_stats(self) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.sock))
            s.sendall(b"GET /stats HTTP/1.0\r\n\r\n")
            chunks = []
            while True:
                data = s.recv(1 << 16)
                if not data:
                    break
                chunks.append(data)
        return json.loads(b"".join(chunks).split(b"\r\n\r\n", 1)[1])

    def traffic(self) -> Traffic:
        return Traffic.parse(self.raw_stats(), self.link.bytes_to_host() if self.link else None)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


def _node_version() -> str:
    try:
        return subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace").strip()
    except OSError:
        return ""
