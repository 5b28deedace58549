"""The scheduling policy, dispatch.pick, as a pure function of download states."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyfs.dispatch import pick
from lazyfs.download import Download, Limits
from lazyfs.filemap import PageBudget
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store

BLOCK = 64 * 1024


@pytest.fixture
def store(tmp_path: Path):
    s = Store.open(str(tmp_path))
    yield s
    s.close()


def download(store: Store, key: str, started: float, background: bool = False, readers: int = 0) -> Download:
    obj = RemoteObject("b", key, 16 * BLOCK, "e" + key, 0)
    dl = Download(obj, store.partials.open(obj, BLOCK), Limits(part_blocks=4, max_requests=8, read_deadline=1),
                  PageBudget(), background=background)
    dl.started, dl.readers, dl.ramp = started, readers, 8
    return dl


def test_blocked_readers_first_then_open_files_sharing_then_prefetch_oldest_first(store: Store) -> None:
    prefetch_old = download(store, "p1", started=1, background=True)
    prefetch_new = download(store, "p2", started=2, background=True)
    opened = download(store, "o", started=3)
    busy = download(store, "busy", started=0)
    busy.next_request()  # already has a request in flight
    waiting = download(store, "w", started=4, background=True)
    waiting.demand.append(9)  # a reader waits for block 9
    downloads = [prefetch_old, prefetch_new, opened, busy, waiting]

    dl, req = pick(downloads) or (None, None)
    assert dl is waiting and req is not None and req.start == 9 * BLOCK and req.end == 11 * BLOCK
    assert pick(downloads)[0] is opened  # type: ignore[index]  # fewest requests in flight first
    assert pick(downloads)[0] is busy  # type: ignore[index]
    for dl in (opened, busy, waiting):
        dl.error = RuntimeError("done with these")
    assert pick(downloads)[0] is prefetch_old  # type: ignore[index]
    prefetch_new.readers = 1  # someone opened it: it is no longer background
    assert pick(downloads)[0] is prefetch_new  # type: ignore[index]
    for dl in downloads:
        dl.partial.close()
