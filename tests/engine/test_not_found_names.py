"""A listed object the object store answers 404 for (a GET, confirmed by a
HEAD): its name goes at once, and comes back as soon as the store finds it
again (a HEAD after a back-off, recheck.py), never later than the next
listing that names it.  Against the in-memory store, whose `not_found` keys
are listed but answer 404 to GETs and HEADs, as SeaweedFS's do for a while
after a link flap."""

from __future__ import annotations

import errno
import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio

from lazyfs import recheck
from lazyfs.catalog import Catalog
from lazyfs.errors import ObjectNotFound, errno_of
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.modeljson import Source
from lazyfs.namespace import Diff, RemoteObject
from lazyfs.recheck import NO_REFRESH_S, Rechecks
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote

SOURCE = Source(BUCKET, "m/")
KiB = 1024
FIRST_S = 0.05  # the first re-check, instead of 2 s


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recheck, "RECHECK_FIRST_S", FIRST_S)


class Mounted:
    """The engine as a mount wires it: the download's 404 reaches the re-checks."""

    def __init__(self, catalog: Catalog, fetcher: Fetcher, rechecks: Rechecks, told: list[Diff]) -> None:
        self.catalog, self.fetcher, self.rechecks, self.told = catalog, fetcher, rechecks, told
        self.handles = Handles(fetcher)

    async def read(self, key: str) -> bytes:
        """Open the name as the kernel would (a lookup first) and read it whole."""
        node = self.catalog.tree.find(key)
        if not isinstance(node, RemoteObject):
            raise FileNotFoundError(errno.ENOENT, "no such name", key)
        fh = await self.handles.open(node)
        try:
            return bytes(await self.handles.read(fh, 0, node.size))
        finally:
            self.handles.release(fh)


@asynccontextmanager
async def mounted(remote: FakeRemote, stores, refresh: float) -> AsyncIterator[Mounted]:
    catalog = Catalog(remote, [SOURCE])
    await catalog.refresh()
    told: list[Diff] = []
    rechecks = Rechecks(catalog, refresh, [told.append])
    fetcher = Fetcher(remote, stores(), fetch_config())
    fetcher.hooks.on_changed = rechecks.object_changed
    async with running(fetcher), trio.open_nursery() as nursery:
        nursery.start_soon(rechecks.run)
        yield Mounted(catalog, fetcher, rechecks, told)
        nursery.cancel_scope.cancel()


async def not_found(m: Mounted, key: str) -> None:
    """A read of `key` fails with ENOENT (a GET answered 404, and its HEAD), and its name goes."""
    with pytest.raises(ObjectNotFound) as info:
        await m.read(key)
    assert errno_of(info.value) == errno.ENOENT
    assert m.catalog.tree.find(key) is None


def heads(remote: FakeRemote, key: str) -> int:
    return sum(1 for c in remote.calls if c.op == "HEAD" and c.key == key)


@trio_test
async def test_a_name_a_404_took_comes_back_as_soon_as_the_store_finds_it_again(remote: FakeRemote,
                                                                               stores) -> None:
    """Before: it stayed away until a listing named it again, up to --refresh
    (60 s by default; with SeaweedFS, whose listing never stopped naming it,
    for good: see the test below)."""
    data = os.urandom(300 * KiB)
    flaky = remote.put(BUCKET, "m/flaky.bin", data)
    remote.put(BUCKET, "m/other.bin", b"o" * 100)
    remote.not_found.add(flaky.key)
    async with mounted(remote, stores, refresh=3600.0) as m:
        lists = len(remote.lists())
        await not_found(m, flaky.key)
        assert m.told[0].removed == (flaky,), "the kernel is told the name went"
        await wait_for(lambda: heads(remote, flaky.key) >= 2, "a re-check that still finds nothing")
        assert m.catalog.tree.find(flaky.key) is None
        remote.not_found.clear()
        await wait_for(lambda: m.catalog.tree.find(flaky.key) == flaky, "the name back")
        assert m.told[-1] == Diff(added=(flaky,)), "the kernel is told the name is back"
        assert await m.read(flaky.key) == data
        assert len(remote.lists()) == lists, "no listing brought it back"
        asked = heads(remote, flaky.key)
        assert await m.read("m/other.bin") == b"o" * 100
        await trio.sleep(20 * FIRST_S)
        assert heads(remote, flaky.key) == asked and heads(remote, "m/other.bin") == 0, "no HEAD but after a 404"


@trio_test
async def test_found_again_as_another_version_it_is_served_as_that_version(remote: FakeRemote, stores) -> None:
    old = remote.put(BUCKET, "m/w.bin", b"old" * 50_000)
    remote.not_found.add(old.key)
    async with mounted(remote, stores, refresh=3600.0) as m:
        await not_found(m, old.key)
        new = remote.put(BUCKET, old.key, b"new!" * 40_000)
        remote.not_found.clear()
        await wait_for(lambda: m.catalog.tree.find(old.key) == new, "the new version served")
        assert m.told[-1] == Diff(added=(new,))
        assert await m.read(old.key) == b"new!" * 40_000, "not a byte of the old version"


@trio_test
async def test_a_deleted_object_is_asked_about_a_few_times_within_the_refresh_interval_and_stays_gone(
        remote: FakeRemote, stores) -> None:
    gone = remote.put(BUCKET, "m/gone.bin", b"g" * 1000)
    remote.put(BUCKET, "m/other.bin", b"o" * 100)
    refresh = 30 * FIRST_S  # re-checks after 1, 3, 7 and 15 times FIRST_S: then 31 > 30, the listing's turn
    async with mounted(remote, stores, refresh=refresh) as m:
        remote.delete(BUCKET, gone.key)
        await not_found(m, gone.key)
        await wait_for(lambda: not m.rechecks.schedule.missing, "the re-checks to end")
        asked = heads(remote, gone.key)
        assert 1 < asked <= 1 + 4, f"{asked} HEADs: one confirming the 404, then at most 4 re-checks"
        await trio.sleep(refresh)
        assert heads(remote, gone.key) == asked, "asked no more once the listing's turn came"
        assert m.catalog.tree.find(gone.key) is None and len(m.told) == 1
        await m.catalog.refresh()
        assert m.catalog.tree.find(gone.key) is None


@trio_test
async def test_a_listing_meanwhile_ends_the_rechecks(remote: FakeRemote, stores) -> None:
    flaky = remote.put(BUCKET, "m/flaky.bin", b"f" * 1000)
    remote.not_found.add(flaky.key)
    async with mounted(remote, stores, refresh=3600.0) as m:
        m.rechecks.schedule.first = 0.5  # (a listing within it)
        await not_found(m, flaky.key)
        await m.catalog.refresh()  # names it: it is back (and the kernel would be told by the refresher)
        assert m.catalog.tree.find(flaky.key) == flaky
        await trio.sleep(1.0)
        assert heads(remote, flaky.key) == 1 and not m.rechecks.schedule.missing, "no HEAD after the listing"


def test_the_mounts_rechecks_last_as_long_as_its_refresh_interval_and_a_minute_without(remote: FakeRemote) -> None:
    catalog = Catalog(remote, [SOURCE])
    assert Rechecks(catalog, 10.0).schedule.horizon == 10.0
    assert Rechecks(catalog, 0).schedule.horizon == NO_REFRESH_S == 60.0, "README: a minute with --refresh 0"
    assert recheck.RECHECK_FIRST_S == FIRST_S


@trio_test
async def test_a_name_a_404_took_comes_back_with_the_next_listing_that_names_it(remote: FakeRemote) -> None:
    """Before: the HEAD's 404 patched the tree, and a listing naming the same
    versions as the one before was dropped as "nothing changed", so the name
    stayed away until something else in the folders changed (with SeaweedFS,
    whose listing names the object all along: for good)."""
    flaky = remote.put(BUCKET, "m/flaky.bin", b"f" * 100)
    remote.put(BUCKET, "m/other.bin", b"o" * 100)
    catalog = Catalog(remote, [SOURCE])
    await catalog.refresh()
    remote.not_found.add(flaky.key)
    assert (await Rechecks(catalog, 60.0).recheck(flaky)).removed == (flaky,)
    assert catalog.tree.find(flaky.key) is None
    remote.not_found.clear()  # the store finds it again; its listing named it all along
    diff = await catalog.refresh()
    assert catalog.tree.find(flaky.key) == flaky, "the listing that names it again did not bring it back"
    assert diff.added == (flaky,) and not diff.removed, "the kernel must be told the name is back"
    assert not await catalog.refresh(), "once applied, an unchanged listing changes nothing"


@trio_test
async def test_a_deleted_object_stays_gone_after_the_next_listing(remote: FakeRemote) -> None:
    gone = remote.put(BUCKET, "m/gone.bin", b"g" * 100)
    remote.put(BUCKET, "m/other.bin", b"o" * 100)
    catalog = Catalog(remote, [SOURCE])
    await catalog.refresh()
    remote.delete(BUCKET, gone.key)
    assert (await Rechecks(catalog, 60.0).recheck(gone)).removed == (gone,)
    diff = await catalog.refresh()
    assert catalog.tree.find(gone.key) is None and not diff.added and not diff.removed


@trio_test
async def test_many_names_a_404_took_at_once_all_go_and_all_come_back_without_a_listing(remote: FakeRemote) -> None:
    """Before: re-checks patching the tree at once found it patched by another
    meanwhile, took that for a listing swapped in, asked for a full listing
    (which named every object again, so their names came back while the store
    still answered 404) and dropped their re-checks; a second 404 of a name
    already gone asked for one too."""
    objs = [remote.put(BUCKET, f"m/f{i:03d}.bin", b"x" * 100) for i in range(30)]
    catalog = Catalog(remote, [SOURCE])
    await catalog.refresh()
    relists: list[int] = []
    rechecks = Rechecks(catalog, 3600.0, relist=lambda: relists.append(1))
    remote.not_found.update(o.key for o in objs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rechecks.run)
        async with trio.open_nursery() as opens:
            for o in objs + objs:  # each twice: two GETs of one file that both met the 404
                opens.start_soon(rechecks.object_changed, o)
        assert not relists, f"{len(relists)} full listings asked for"
        assert all(catalog.tree.find(o.key) is None for o in objs), "a name a 404 took is still there"
        assert set(rechecks.schedule.missing) == {o.key for o in objs}, "re-checks dropped"
        remote.not_found.clear()
        await wait_for(lambda: all(catalog.tree.find(o.key) == o for o in objs), "every name back")
        assert not relists
        nursery.cancel_scope.cancel()
