"""A gateway in front of the test proxy: an S3 endpoint under a path
(`http://127.0.0.1:PORT/gw`, as some S3 gateways and reverse proxies serve
it), optionally over TLS with a self-signed certificate.

It forwards `/gw/bucket/key` to the proxy as `/bucket/key`, and answers a
request that misses the path with 404 NoSuchBucket, as such a gateway does,
so a client that dropped the path is seen failing.  It runs in threads of
the test process: tests that use it read files with read(), never mmap (see
proxy.py for why that matters).
"""

from __future__ import annotations

import http.client
import ssl
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and localhost) signed by itself: (cert, key)."""
    cert, key = folder / "gw.crt", folder / "gw.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


class Gateway:
    """`with Gateway(proxy.endpoint, "/gw") as gw: gw.endpoint` - stopped on exit."""

    def __init__(self, upstream: str, prefix: str, tls: tuple[Path, Path] | None = None) -> None:
        up = urllib.parse.urlsplit(upstream)
        self.prefix = prefix
        self.requests: list[tuple[str, str]] = []  # every request's (method, path) as the gateway received it
        self.lock = threading.Lock()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with gateway.lock:
                    gateway.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if not self.path.startswith(gateway.prefix + "/"):
                    data = b"<Error><Code>NoSuchBucket</Code><Message>not under the gateway's path</Message></Error>"
                    self.send_response(404)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path[len(gateway.prefix):], body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for name, value in resp.getheaders():
                        if name.lower() not in _HOP and (self.command == "HEAD" or name.lower() != "content-length"):
                            self.send_header(name, value)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.endpoint = f"{scheme}://127.0.0.1:{self._server.server_address[1]}{prefix}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="gateway", daemon=True)

    def __enter__(self) -> Gateway:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def gets(self, key: str) -> list[str]:
        """The paths of the GETs of `key` that reached the gateway."""
        with self.lock:
            return [p for m, p in self.requests if m == "GET" and urllib.parse.unquote(p.split("?")[0]).endswith(key)]
