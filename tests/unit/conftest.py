"""Fixtures of the unit tier."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from lazyfs import exhausted
from lazyfs.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh store in tmp_path/store."""
    (tmp_path / "store").mkdir()
    s = Store.open(str(tmp_path / "store"))
    yield s
    s.close()


@pytest.fixture(autouse=True)
def whose_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command run in this process (cli._run) says "this process's" limit
    from then on (exhausted.not_a_daemon): put back for the next test."""
    monkeypatch.setattr(exhausted, "_whose", list(exhausted._whose))


@pytest.fixture
def static_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's AWS settings gone, and static keys with no config or
    credentials file: a real client made here talks to no one it found."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTTESTTEST0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
