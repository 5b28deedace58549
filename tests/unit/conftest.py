"""Fixtures of the unit tier."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from lazyfs.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh store in tmp_path/store."""
    (tmp_path / "store").mkdir()
    s = Store.open(str(tmp_path / "store"))
    yield s
    s.close()
