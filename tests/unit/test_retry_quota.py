"""`--retries N` is N retries of every request, however many fail (botoretries.py):
botocore's standard mode would stop retrying any request once the client's
shared retry quota is spent (500, 14 a retry after no response).  Through
the real client, against a port nothing listens on: if a botocore upgrade
makes its quota another way, this fails."""

from __future__ import annotations

import http.server
import os
import threading
from typing import Any

import pytest

from lazyfs.config import RemoteConfig
from lazyfs.errors import RemoteError, RemoteUnavailable
from lazyfs.namespace import RemoteObject
from lazyfs.remote import Remote

ATTEMPTS = 4  # --retries 3
REQUESTS = 60  # 180 retries: 2,520 of the stock quota's 500


@pytest.fixture
def remote(monkeypatch: pytest.MonkeyPatch) -> Remote:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNITTEST0000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    cfg = RemoteConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1", max_attempts=ATTEMPTS,
                       connect_timeout=1.0, read_timeout=1.0)  # (port 9: the connection is refused at once)
    monkeypatch.setattr("botocore.endpoint.time.sleep", lambda s: None)  # botocore's backoff, not waited out
    return Remote(cfg)


def _attempts(remote: Remote) -> list[int]:
    sent: list[int] = []
    remote._client.meta.events.register("before-send.s3", lambda **_: sent.append(1))
    return sent


@pytest.mark.parametrize("op", ["GET", "HEAD", "LIST"])
def test_every_request_gets_all_its_retries_however_many_fail(remote: Remote, op: str) -> None:
    sent = _attempts(remote)
    obj = RemoteObject("b", "k", 10, "e", 0)
    calls: dict[str, Any] = {"GET": lambda: remote.get_range(obj, 0, 10), "HEAD": lambda: remote.head("b", "k"),
                             "LIST": lambda: remote.list_some("b", "p/")}
    for n in range(1, REQUESTS + 1):
        with pytest.raises(RemoteUnavailable):
            calls[op]()
        assert len(sent) == n * ATTEMPTS, f"request {n}: {len(sent) - (n - 1) * ATTEMPTS} attempts, not {ATTEMPTS}"


class _Answers500(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"
        self.send_response(500)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("failure", ["connection refused", "HTTP 500"])
def test_botocores_retries_wait_as_long_as_ours_whatever_failed(remote: Remote, monkeypatch: pytest.MonkeyPatch,
                                                               failure: str) -> None:
    """botocore's standard mode waits 50 ms (times 0-1, doubling) before
    retrying anything but throttling: 4 retries were spent within 0.75 s, and
    a 1.5 s burst of 500s (a gateway restarting) failed the read with EIO.
    Its retries now wait as lazyfs's own do (backoff.py): 0.4 s, doubling,
    times 0.5-1.5."""
    waits: list[float] = []
    monkeypatch.setattr("botocore.endpoint.time.sleep", waits.append)
    server = None
    if failure == "HTTP 500":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers500)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        remote._client.meta.events.register_first(
            "before-send.s3", lambda request, **_: setattr(request, "url", request.url.replace(
                "127.0.0.1:9", f"127.0.0.1:{server.server_address[1]}")))
    try:
        for _ in range(20):
            with pytest.raises(RemoteUnavailable if failure != "HTTP 500" else RemoteError):
                remote.get_range(RemoteObject("b", "k", 10, "e", 0), 0, 10)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    assert len(waits) == 20 * (ATTEMPTS - 1)
    for i in range(ATTEMPTS - 1):
        theirs = waits[i::ATTEMPTS - 1]
        low, high = 0.4 * 2 ** i * 0.5, 0.4 * 2 ** i * 1.5
        assert all(low <= w <= high for w in theirs), (i + 1, theirs)
