"""Fixtures of the unit tier."""

from __future__ import annotations

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
