"""Credential sources a test can take down and bring back: an HTTP endpoint
that serves both the container credentials endpoint
(`AWS_CONTAINER_CREDENTIALS_FULL_URI`) and the instance metadata service
(`AWS_EC2_METADATA_SERVICE_ENDPOINT`), and a `credential_process` helper.

Each hands out the same keys, valid for an hour (moto takes any key); the
proxy sees them in the requests they sign (`KEY`)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
import time
from pathlib import Path

from support.s3server import free_port

KEY = "ASIACREDSOURCE000001"


def _keys(valid_s: float = 3600) -> dict[str, str]:
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + valid_s))
    return {"Code": "Success", "AccessKeyId": KEY, "SecretAccessKey": "s", "Token": "t", "Expiration": expires}


class CredentialEndpoint:
    """`mode`: "down" (nothing listens: connections refused), "500" (every
    request answered 500), "slow 500" (answered 500 after SLOW_S, within
    botocore's timeout of a request to it: its retries take longer), "hang"
    (connections accepted, never answered), "expired" (keys that expired an
    hour ago: an endpoint whose clock or rotation is broken) or "up" (keys).  Its port stays
    the same through every mode."""

    ROLE = "lazyfs-node"
    SLOW_S = 1.5  # botocore's container endpoint requests time out after 2 s

    def __init__(self, mode: str = "down") -> None:
        self.port = free_port()
        self.container_url = f"http://127.0.0.1:{self.port}/creds"
        self.imds_url = f"http://127.0.0.1:{self.port}/"
        self.mode = mode
        self.asked = 0
        self._closed = threading.Event()
        self._server: http.server.ThreadingHTTPServer | None = None
        self.set(mode)

    def set(self, mode: str) -> None:
        assert mode in ("down", "500", "slow 500", "hang", "expired", "up"), mode
        self.mode = mode
        if mode == "down":
            self._stop()
        elif self._server is None:
            self._listen()

    def env(self, source: str) -> dict[str, str]:
        """The environment that makes botocore ask it: as a "container" endpoint, or as "imds"."""
        if source == "container":
            return {"AWS_CONTAINER_CREDENTIALS_FULL_URI": self.container_url}
        return {"AWS_EC2_METADATA_DISABLED": "false", "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds_url}

    def _listen(self) -> None:
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_PUT(self) -> None:  # IMDSv2's session token
                self.do_GET(b"imds-token")

            def do_GET(self, body: bytes | None = None) -> None:
                endpoint.asked += 1
                if endpoint.mode == "hang":
                    endpoint._closed.wait(120)
                    return
                if endpoint.mode == "slow 500":
                    endpoint._closed.wait(endpoint.SLOW_S)
                if endpoint.mode not in ("up", "expired"):
                    self._answer(500, b"")
                    return
                if body is None:
                    path = self.path.rstrip("/")
                    if path.endswith("/security-credentials"):
                        body = endpoint.ROLE.encode()
                    else:  # the container endpoint, or the instance role's keys
                        body = json.dumps(_keys(-3600 if endpoint.mode == "expired" else 3600)).encode()
                self._answer(200, body)

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server

    def _stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def close(self) -> None:
        self._closed.set()
        self._stop()


_HELPER = """#!/bin/sh
[ -f {d}/fail ] && {{ echo "token service said no" >&2; exit 2; }}
[ -f {d}/hang ] && {{ echo $$ > {d}/hung.pid; exec sleep 300; }}
printf '{{"Version": 1, "AccessKeyId": "{key}", "SecretAccessKey": "s", "SessionToken": "t", '
printf '"Expiration": "%s"}}' "$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)"
"""


class CredentialHelper:
    """A credential_process in `folder`: it fails while `fail` exists there, hangs while `hang` does."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.script = folder / "helper.sh"
        self.script.write_text(_HELPER.format(d=folder, key=KEY))
        self.script.chmod(0o755)

    def set(self, mode: str) -> None:
        """"fail", "hang" or "up"."""
        for name in ("fail", "hang"):
            (self.folder / name).unlink(missing_ok=True)
        if mode != "up":
            (self.folder / mode).touch()

    def config(self) -> Path:
        """An AWS config file whose default profile runs the helper."""
        path = self.folder / "aws-config"
        path.write_text(f"[default]\ncredential_process = {self.script}\n")
        return path

    def close(self) -> None:
        """Kill the helper we made hang, if it is still there (lazyfs kills its own at its bounded wait)."""
        pid = self.folder / "hung.pid"
        if pid.exists():
            try:
                os.kill(int(pid.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
