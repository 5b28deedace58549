"""A first listing that fails (issue 11 #14), with the operations called
directly: no name looks missing before something was listed, a folder
answers EIO instead of an empty or hanging readdir, the store's saved
listing is served meanwhile, and the listing is tried again soon, whatever
--refresh says."""

from __future__ import annotations

import dataclasses
import errno

import pyfuse3
import pytest
import trio
import trio.testing

from lazyfs import lister, refresher
from lazyfs.catalog import Catalog
from lazyfs.errors import RemoteFailing, RemoteUnavailable
from lazyfs.fetch import Fetcher
from lazyfs.fuse_ops import Operations
from lazyfs.handles import Handles
from lazyfs.inodes import ROOT_INODE
from lazyfs.modeljson import Source
from lazyfs.namespace import Diff
from lazyfs.quiet import Quiet
from lazyfs.recheck import Rechecks
from lazyfs.refresher import Refresher
from lazyfs.storespace import StoreSpace
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import Call, FakeRemote, Gate

CTX = None
SOURCE = Source(BUCKET, "m/")


class Outage:
    """Every LIST fails while `on`, like a store that throttles everything."""

    def __init__(self, remote: FakeRemote) -> None:
        self.on = True
        remote.on_list.append(self)

    def __call__(self, call: Call) -> None:
        if self.on:
            raise RemoteUnavailable("s3://bkt/m/: object store kept failing (SlowDown: Reduce your request rate)")


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lister, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(refresher, "FIRST_RETRY_S", 0.05)


def reading(nursery: trio.Nursery, ops: Operations, fh: int) -> trio.Event:
    """Read the first 4 KiB of `fh` in the background; set once answered."""
    answered = trio.Event()

    async def read() -> None:
        await ops.read(fh, 0, 4096)
        answered.set()

    nursery.start_soon(read)
    return answered


async def lookup_errno(ops: Operations, *names: str) -> int:
    """0 if the path is found, the errno if not (ENOENT for a negative entry)."""
    ino = ROOT_INODE
    try:
        for name in names:
            attrs = await ops.lookup(ino, name.encode(), CTX)
            if attrs.st_ino == 0:
                return errno.ENOENT
            ino = attrs.st_ino
    except pyfuse3.FUSEError as e:
        return e.errno
    return 0


@trio_test
async def test_no_name_looks_missing_while_the_first_listing_fails(remote: FakeRemote, stores) -> None:
    remote.put(BUCKET, "m/sub/w.bin", b"w")
    outage = Outage(remote)
    catalog = Catalog(remote, [SOURCE])
    ops = Operations(catalog, Handles(Fetcher(remote, stores(), fetch_config())), StoreSpace(stores().fsinfo))
    changes: list[Diff] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Refresher(catalog, 0, [changes.append]).run)  # --refresh 0
        await wait_for(lambda: catalog.state == "failing", "the first listing to fail")
        assert await lookup_errno(ops, "m", "sub", "w.bin") == errno.EIO, "not a cacheable negative entry"
        folder = (await ops.lookup(ROOT_INODE, b"m", CTX)).st_ino
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await ops.opendir(folder, CTX)
        assert failed.value.errno == errno.EIO, "a folder's listing fails, it is not empty"
        outage.on = False
        await wait_for(lambda: catalog.live, "the listing, tried again soon", timeout=5)
        assert await lookup_errno(ops, "m", "sub", "w.bin") == 0
        assert await lookup_errno(ops, "m", "nothing") == errno.ENOENT
        nursery.cancel_scope.cancel()
    assert changes == [], "nothing was served before, so nothing to invalidate"


@trio_test
async def test_a_lookup_before_the_listing_lists_its_own_name(remote: FakeRemote, stores) -> None:
    remote.put(BUCKET, "m/sub/w.bin", b"w")

    def bulk_fails(call: Call) -> None:
        if call.key.endswith("/"):  # a lookup lists its own name, with no slash
            raise RemoteUnavailable("s3://bkt/m/: object store kept failing (SlowDown)")

    remote.on_list.append(bulk_fails)
    catalog = Catalog(remote, [SOURCE])
    ops = Operations(catalog, Handles(Fetcher(remote, stores(), fetch_config())), StoreSpace(stores().fsinfo))
    with pytest.raises(RemoteUnavailable):
        await catalog.first_listing()
    assert catalog.state == "failing"
    assert await lookup_errno(ops, "m", "sub", "w.bin") == 0, "the lookup's own listing works"
    assert await lookup_errno(ops, "m", "sub", "gone.bin") == errno.ENOENT, "listed, and not there"


@trio_test
async def test_the_saved_listing_is_served_while_the_first_listing_fails(remote: FakeRemote, stores) -> None:
    store = stores()
    remote.put(BUCKET, "m/a.bin", b"a" * 1000)
    remote.put(BUCKET, "m/gone.bin", b"g")
    await Catalog(remote, [SOURCE], store).refresh()  # saves the listing, as a mount does
    remote.delete(BUCKET, "m/gone.bin")
    remote.put(BUCKET, "m/new.bin", b"n")
    outage = Outage(remote)
    fetcher = Fetcher(remote, store, fetch_config())
    catalog = Catalog(remote, [SOURCE], store)
    ops = Operations(catalog, Handles(fetcher), StoreSpace(store.fsinfo))
    changes: list[Diff] = []
    async with running(fetcher), trio.open_nursery() as nursery:
        nursery.start_soon(Refresher(catalog, 0, [changes.append]).run)
        await catalog.settled.wait()
        assert catalog.state == "saved" and not catalog.offline
        assert await lookup_errno(ops, "m", "a.bin") == 0
        assert await lookup_errno(ops, "m", "new.bin") == errno.EIO, "not in the saved listing: asked, failed"
        attrs = await ops.lookup((await ops.lookup(ROOT_INODE, b"m", CTX)).st_ino, b"a.bin", CTX)
        info = await ops.open(attrs.st_ino, 0, CTX)
        assert bytes(await ops.read(info.fh, 0, 1000)) == b"a" * 1000, "the object store serves data"
        await ops.release(info.fh)
        outage.on = False
        # The listing goes live before its diff (computed in a worker, then
        # saved) reaches the listeners: wait for the diff itself.
        await wait_for(lambda: catalog.live and bool(changes), "the live listing's diff", timeout=5)
        nursery.cancel_scope.cancel()
    assert [o.key for o in changes[0].added] == ["m/new.bin"], "the kernel is told what the saved listing lacked"
    assert [o.key for o in changes[0].removed] == ["m/gone.bin"]


@dataclasses.dataclass
class ModelBesideFiles:
    """A mount's engine with readers-first listing (quiet.py) over m/: a
    model whose GETs wait at a gate, beside `files` small app files."""

    gate: Gate
    fetcher: Fetcher
    catalog: Catalog
    ops: Operations

    @classmethod
    def make(cls, remote: FakeRemote, stores, files: int, quiet_s: float) -> ModelBesideFiles:
        for i in range(files):
            remote.put(BUCKET, f"m/app/f{i:05d}.json", b"{}")
        remote.put(BUCKET, "m/model.bin", b"w" * 100_000)
        store = stores()
        fetcher = Fetcher(remote, store, fetch_config())
        fetcher.hooks.quiet = quiet = Quiet(quiet_s)
        catalog = Catalog(remote, [SOURCE], store, quiet=quiet)
        ops = Operations(catalog, Handles(fetcher), StoreSpace(store.fsinfo))
        return cls(remote.gate("m/model.bin"), fetcher, catalog, ops)

    async def open_model(self) -> int:
        ops = self.ops
        attrs = await ops.lookup((await ops.lookup(ROOT_INODE, b"m", CTX)).st_ino, b"model.bin", CTX)
        return (await ops.open(attrs.st_ino, 0, CTX)).fh


@trio_test
async def test_the_first_listing_waits_for_a_readers_get_and_a_quiet_moment(remote: FakeRemote, stores) -> None:
    """quiet.py: a folder bigger than the start-up page is listed after the
    requests readers wait for, not beside them (an open right after the
    mount first)."""
    m = ModelBesideFiles.make(remote, stores, files=300, quiet_s=0.2)
    gate, catalog, ops = m.gate, m.catalog, m.ops
    async with running(m.fetcher), trio.open_nursery() as nursery:
        fh = await m.open_model()
        lookup_lists = len(remote.lists())
        got: list[bytes] = []

        async def read() -> None:
            got.append(bytes(await ops.read(fh, 0, 4096)))

        nursery.start_soon(read)
        await wait_for(lambda: gate.waiting, "the reader's GET")
        nursery.start_soon(catalog.first_listing)
        await trio.sleep(0.5)
        assert len(remote.lists()) == lookup_lists, "the listing went beside the reader's GET"
        gate.release()
        await wait_for(lambda: got, "the reader's bytes")
        ended = trio.current_time()
        await wait_for(lambda: catalog.live, "the first listing")
        assert trio.current_time() - ended >= 0.15, "the listing waited for the network to be quiet"
        assert got == [b"w" * 4096]
        await ops.release(fh)


@trio_test
async def test_a_listing_someone_waits_for_does_not_wait_for_quiet(remote: FakeRemote, stores) -> None:
    """A folder too big for a lookup's own listing (find, ls of it) needs the
    first listing: it goes at once, beside readers' GETs in flight."""
    m = ModelBesideFiles.make(remote, stores, files=1200, quiet_s=60.0)
    gate, catalog, ops = m.gate, m.catalog, m.ops
    async with running(m.fetcher), trio.open_nursery() as nursery:
        fh = await m.open_model()
        read = reading(nursery, ops, fh)
        await wait_for(lambda: gate.waiting, "the reader's GET")
        nursery.start_soon(catalog.first_listing)
        with trio.fail_after(10):
            folder = await catalog.folder("m/app")
        assert folder is not None and len(folder.names) == 1200
        assert gate.waiting, "listed while the reader's GET was still in flight"
        gate.release()
        await wait_for(lambda: catalog.live, "the first listing")
        await wait_for(read.is_set, "the read answered")  # the kernel releases a handle after its reads
        await ops.release(fh)


@trio_test
async def test_a_refresh_after_the_first_listing_does_not_wait_for_quiet(remote: FakeRemote, stores) -> None:
    """Only the first listing yields to readers: a refresh (--refresh, a
    lookup of a name the tree lacks) keeps the view current and goes at once,
    beside a reader's GET in flight."""
    m = ModelBesideFiles.make(remote, stores, files=300, quiet_s=0.1)
    gate, catalog, ops = m.gate, m.catalog, m.ops
    quiet = m.fetcher.hooks.quiet
    assert quiet is not None
    async with running(m.fetcher), trio.open_nursery() as nursery:
        nursery.start_soon(catalog.first_listing)
        await wait_for(lambda: catalog.live, "the first listing, after a quiet moment")
        assert not quiet.hurried
        quiet.quiet_s = 60.0  # were refreshes held back, this one would wait a minute
        fh = await m.open_model()
        read = reading(nursery, ops, fh)
        await wait_for(lambda: gate.waiting, "the reader's GET")
        remote.put(BUCKET, "m/app/new.json", b"{}")
        with trio.fail_after(5):
            diff = await catalog.refresh()
        assert [o.key for o in diff.added] == ["m/app/new.json"]
        assert gate.waiting, "refreshed while the reader's GET was still in flight"
        gate.release()
        await wait_for(read.is_set, "the read answered")  # the kernel releases a handle after its reads
        await ops.release(fh)


@trio_test
async def test_an_object_replaced_before_the_first_listing_is_in_is_corrected_in_it(remote: FakeRemote) -> None:
    """A download finds its object replaced (Rechecks.recheck) while the first
    listing, built from the start-up page read before the change, is not in
    yet: the recheck waits for it and corrects it, or the listing would put
    the old version back and the next open would read it again (ESTALE)."""
    old = remote.put(BUCKET, "m/big.bin", b"old" * 1000)
    catalog = Catalog(remote, [SOURCE], quiet=Quiet(60.0))
    catalog.listed_at_start({SOURCE: [old]})  # the start-up page, before the change
    new = remote.put(BUCKET, "m/big.bin", b"new" * 1001)
    got: list[Diff] = []

    async def recheck() -> None:
        got.append(await Rechecks(catalog, 60.0).recheck(old))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(recheck)
        await trio.sleep(0.1)
        nursery.start_soon(catalog.first_listing)
    assert catalog.tree.find("m/big.bin") == new
    assert got and got[0].changed == ((old, new),), "the kernel is told to forget the old version"


def test_the_quiet_period_counts_from_when_readers_can_come_not_from_start_up() -> None:
    """A start-up slower than the quiet period (a loaded machine) must not use
    the period up before the kernel's INIT: the background listing then went
    first, ahead of the readers' first requests."""
    returned: list[float] = []

    async def main() -> None:
        quiet = Quiet(0.1)
        await trio.sleep(0.5)  # pyfuse3.init, the kernel's INIT: slower than the period
        quiet.restart()
        began = trio.current_time()
        await quiet.turn()
        returned.append(trio.current_time() - began)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert returned and returned[0] >= 0.1 - 1e-9, \
        f"a background listing went {returned[0]:.2f} s after readers could come"


@trio_test
async def test_a_start_up_listing_answered_with_errors_is_a_failing_first_listing(remote: FakeRemote,
                                                                                  stores) -> None:
    """The start-up's LIST was answered with 5xx/SlowDown through its retries (RemoteFailing): the object
    store is reachable, so the mount is no offline one (before: OFFLINE, or exit 1 with an empty store).
    The first listing's first attempt fails with that answer, without asking again: the saved listing is
    served at once, with its files fetched, and the listing is retried."""
    store = stores()
    remote.put(BUCKET, "m/a.bin", b"a" * 1000)
    await Catalog(remote, [SOURCE], store).refresh()  # saves the listing, as a mount does
    lists = remote.count("LIST")
    catalog = Catalog(remote, [SOURCE], store)
    catalog.listed_at_start({}, RemoteFailing("s3://bkt/m/: object store kept failing (SlowDown: Reduce ...)"))
    outage = Outage(remote)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Refresher(catalog, 0).run)
        await catalog.settled.wait()
        assert catalog.state == "saved" and not catalog.offline and "SlowDown" in catalog.last.error
        assert remote.count("LIST") == lists, "the start-up's answer was asked for again"
        outage.on = False
        await wait_for(lambda: catalog.live, "the live listing")
        nursery.cancel_scope.cancel()
