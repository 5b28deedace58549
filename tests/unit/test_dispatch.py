"""The scheduling policy, dispatch.pick, as a pure function of download states."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

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


def download(store: Store, key: str, started: float, background: bool = False, readers: int = 0,
             whole_parts: bool = False) -> Download:
    obj = RemoteObject("b", key, 16 * BLOCK, "e" + key, 0)
    limits = Limits(part_blocks=4, max_requests=8, read_deadline=1, whole_parts=whole_parts)
    dl = Download(obj, store.partials.open(obj, BLOCK), limits, PageBudget(), background=background)
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


@pytest.mark.parametrize("whole_parts", [False, True])
def test_where_requests_arrive_whole_a_readers_requests_are_one_block(store: Store, whole_parts: bool) -> None:
    """boto3 hands a reader the first 64 KiB of any request, so the sweep
    starts with a whole part and a jump ahead takes two blocks; the CRT's
    client hands over a request only once whole, so there the file's first
    request (its header) and a jump ahead are one block each."""
    dl = download(store, "d", started=0, whole_parts=whole_parts)
    first = dl.next_request()
    assert first is not None and (first.start, first.end) == (0, (1 if whole_parts else 4) * BLOCK)
    dl.demand.append(9)
    jump = dl.next_request()
    assert jump is not None and (jump.start, jump.end) == (9 * BLOCK, (10 if whole_parts else 11) * BLOCK)
    sweep = dl.next_request()
    assert sweep is not None and sweep.end - sweep.start == 4 * BLOCK, "the rest of the sweep goes by whole parts"
    dl.partial.close()


@pytest.mark.parametrize("whole_parts", [False, True])
def test_where_requests_arrive_whole_the_sweep_takes_what_lands_within_the_deadline(
        store: Store, whole_parts: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CRT shows no byte of a request until all of it is in: on a link
    where a block takes a third of the deadline, a part of four would leave a
    reader waiting for one of them without a sign of life for longer than the
    deadline.  The sweep then goes block by block; on a fast link by parts.
    boto3 shows bytes as they come: always whole parts."""
    obj = RemoteObject("b", "slow", 16 * BLOCK, "eslow", 0)
    limits = Limits(part_blocks=4, max_requests=8, read_deadline=3, whole_parts=whole_parts,
                    unseen_s=3 if whole_parts else 0)
    dl = Download(obj, store.partials.open(obj, BLOCK), limits, PageBudget(), background=False)
    clock = [100.0]
    for module in ("lazyfs.download", "lazyfs.partpace"):  # (the pace times the requests)
        monkeypatch.setattr(f"{module}.time", SimpleNamespace(monotonic=lambda: clock[0]))
    first = dl.next_request()
    assert first is not None
    clock[0] += 1.0  # the first block took a third of the deadline
    dl.progress(first, first.end - first.start)
    slow = dl.next_request()
    assert slow is not None and slow.end - slow.start == (1 if whole_parts else 4) * BLOCK
    clock[0] += 0.001  # this one came at once
    dl.progress(slow, slow.end - slow.start)
    fast = dl.next_request()
    assert fast is not None and fast.end - fast.start == 4 * BLOCK
    dl.partial.close()
