"""The mount's first requests (startup.py) and the client's start-up cost."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from lazyfs.config import MountConfig, RemoteConfig, Source
from lazyfs.errors import RemoteUnavailable
from lazyfs.remote import Remote
from lazyfs.startup import FirstListing


@pytest.fixture
def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_client_finds_s3s_model_without_listing_every_service(fake_credentials: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore lists all of its 400+ service folders (and stats each) before
    loading a model, to check the name; the mount's client looks up s3's only."""
    listed: list[str] = []
    real = os.listdir

    def counting(path: str = ".") -> list[str]:
        listed.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", counting)
    remote = Remote(RemoteConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1"))
    assert remote.endpoint == "http://127.0.0.1:9"
    assert len(listed) < 20, f"{len(listed)} folders listed"


def test_a_listing_error_reaches_the_main_thread(fake_credentials: None, tmp_path: Path) -> None:
    cfg = MountConfig(mountpoint=tmp_path, sources=(Source(bucket="models", prefix="llm/"),),
                      remote=RemoteConfig(endpoint_url=f"http://127.0.0.1:{closed_port()}", region="us-east-1",
                                          max_attempts=1, connect_timeout=2.0))
    first = FirstListing(cfg)
    with pytest.raises(RemoteUnavailable):
        first.result()
