"""`--retries N` is N retries of every request, however many fail (remote.py):
botocore's standard mode would stop retrying any request once the client's
shared retry quota is spent (500, 14 a retry after no response).  Through
the real client, against a port nothing listens on: if a botocore upgrade
makes its quota another way, this fails."""

from __future__ import annotations

import os
from typing import Any

import pytest

from lazyfs.config import RemoteConfig
from lazyfs.errors import RemoteUnavailable
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
