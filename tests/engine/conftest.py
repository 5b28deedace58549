"""Engine tier: the download engine, the handles and the FUSE operations
class driven directly, against an in-memory object store (support/fakeremote),
in one process, without a kernel.  Each test runs its own trio loop under a
deadline (support/enginekit.trio_test), so a lost wake-up fails the test
instead of hanging it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from lazyfs.store import Store
from support.fakeremote import FakeRemote


@pytest.fixture
def remote() -> FakeRemote:
    return FakeRemote()


class Stores:
    """Store folders for a test; every one opened is closed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.opened: list[Store] = []

    def __call__(self, name: str = "store") -> Store:
        path = self.tmp_path / name
        path.mkdir(exist_ok=True)
        store = Store.open(str(path))
        self.opened.append(store)
        return store


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    s = Stores(tmp_path)
    yield s
    for store in s.opened:
        store.close()
