"""A follower whose owner published the file it follows, and whose owner's
cache budget evicted it at once (nobody has it open on that mount), before
the follower's next poll: the bytes it served were verified, so it keeps
serving them from the file it holds, neither refusing its handles as if
the owner had started over after bad bytes, nor taking the download over
as if the owner had died (two mounts on one store, both with
--cache-max-size: issue 45 F1)."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import pytest

from lazyfs.coop import ForeignDownload
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store
from support.enginekit import BUCKET, fetch_config, running, trio_test
from support.fakeremote import FakeRemote

BLOCK = 256 * 1024
NOT_THESE = ("started its download over", "is gone", "failed verification")


class Owner:
    """The owner of `obj`'s download in another process, driven by hand
    through its own store: two blocks on disk and recorded."""

    def __init__(self, store: Store, obj: RemoteObject, data: bytes) -> None:
        self.store, self.obj, self.data = store, obj, data
        lock = store.partials.lock(obj)
        assert lock is not None
        self.lock = lock
        self.part = store.partials.open(obj, BLOCK)
        os.pwrite(self.part.fd, data[:2 * BLOCK], 0)
        self.part.save_state({0, 1})
        self.again: Any = None

    def publish_and_evict(self, refetch: bool) -> None:
        """The rest of the bytes, verified and published; its lock given
        back; its budget evicts the file; and (`refetch`) a reader there
        opens it again at once: a fresh download, a new sparse file."""
        os.pwrite(self.part.fd, self.data, 0)
        assert self.store.publish(self.part, verified="crc32")
        self.store.partials.unlock(self.obj, self.lock)
        assert self.store.evict([self.obj.key]) == len(self.data)
        if refetch:
            lock = self.store.partials.lock(self.obj)
            assert lock is not None
            self.lock, self.again = lock, self.store.partials.open(self.obj, BLOCK)
            os.pwrite(self.again.fd, self.data[:BLOCK], 0)
            self.again.save_state({0})

    def close(self) -> None:
        self.part.close()
        if self.again is not None:
            self.again.close()
            self.store.partials.unlock(self.obj, self.lock)


@pytest.mark.parametrize("when", ["between-polls", "inside-a-poll"])
@pytest.mark.parametrize("refetch", [True, False], ids=["refetched", "evicted"])
@trio_test
async def test_a_follower_keeps_serving_a_file_published_then_evicted(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        when: str, refetch: bool) -> None:
    caplog.set_level(logging.INFO, logger="lazyfs")
    data = os.urandom(4 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    owner = Owner(stores(), obj, data)
    drops: list[RemoteObject] = []
    follower_store = stores()
    follower = Fetcher(remote, follower_store, fetch_config())
    follower.hooks.on_bad_data = drops.append

    # The follower's polls run one at a time under `quiet`: the owner's steps,
    # taken while holding it, all fall between two polls...
    quiet = threading.Lock()
    poll = ForeignDownload._poll

    def gated_poll(self: ForeignDownload, *args: Any) -> Any:
        with quiet:
            return poll(self, *args)

    monkeypatch.setattr(ForeignDownload, "_poll", gated_poll)
    # ...or inside one: after it found nothing published, before it looks at the lock.
    armed = threading.Event()
    find_current = follower_store.find_current

    def find_then_publish(o: RemoteObject, *args: Any) -> Any:
        found = find_current(o, *args)
        if armed.is_set() and o == obj:
            armed.clear()
            owner.publish_and_evict(refetch)
        return found

    monkeypatch.setattr(follower_store, "find_current", find_then_publish)
    try:
        async with running(follower):
            handles = Handles(follower)
            fh = await handles.open(obj)
            assert isinstance(handles._open[fh].download, ForeignDownload)
            assert bytes(await handles.read(fh, 0, BLOCK)) == data[:BLOCK]
            if when == "between-polls":
                with quiet:
                    owner.publish_and_evict(refetch)
            else:
                armed.set()
            # The rest of the file, from the file the follower holds (its name is gone).
            assert bytes(await handles.read(fh, BLOCK, 3 * BLOCK)) == data[BLOCK:]
            assert not armed.is_set()
            assert bytes(await handles.read(fh, 0, len(data))) == data
            handles.release(fh)
    finally:
        owner.close()
    assert drops == [], "the kernel was told to drop pages of good bytes"
    assert remote.count("GET") == 0, "the follower downloaded again what it had, verified"
    said = [r.getMessage() for r in caplog.records]
    assert not [line for line in said if any(s in line for s in NOT_THESE)], said


@trio_test
async def test_a_follower_with_nothing_to_continue_says_so(remote: FakeRemote, stores,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A follower that never saw a record (the owner's download was over
    within its first poll), finding the lock free and the file evicted,
    downloads it: it does not claim the owner died, or that it continues."""
    caplog.set_level(logging.INFO, logger="lazyfs")
    data = os.urandom(4 * BLOCK)
    obj = remote.put(BUCKET, "m/w.bin", data)
    owner = stores()
    lock = owner.partials.lock(obj)
    assert lock is not None
    follower = Fetcher(remote, stores(), fetch_config())
    async with running(follower):
        handles = Handles(follower)
        fh = await handles.open(obj)
        assert isinstance(handles._open[fh].download, ForeignDownload)
        part = owner.partials.open(obj, BLOCK)  # the whole download, between two polls
        os.pwrite(part.fd, data, 0)
        assert owner.publish(part, verified="crc32")
        owner.partials.unlock(obj, lock)
        assert owner.evict([obj.key]) == len(data)
        part.close()
        assert bytes(await handles.read(fh, 0, len(data))) == data
        handles.release(fh)
    said = [r.getMessage() for r in caplog.records]
    assert [line for line in said if "left nothing to continue" in line], said
    assert not [line for line in said if "is gone" in line or "continuing its download" in line], said
