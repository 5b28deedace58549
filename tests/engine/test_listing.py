"""Listings against the in-memory store, counting requests: what a listing
costs for the shapes users mount, that its key ranges cover every key once
whatever the shape and the interleaving, that one failed request is retried
on its own, and that lookups and reads never queue behind a refresh."""

from __future__ import annotations

import logging
import os
import random
import threading

import pytest
import trio

from lazyfs import lister
from lazyfs.catalog import Catalog
from lazyfs.errors import AccessDenied, RemoteUnavailable
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.modeljson import Source
from lazyfs.namespace import RemoteObject
from lazyfs.refresher import Refresher
from lazyfs.repeats import RepeatedLines
from lazyfs.stats import STATS
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import Call, FakeRemote, Gate

P = "p/"
MODEL = ["model.safetensors", "config.json", "tokenizer.json"] + [
    f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]


def model_folder(remote: FakeRemote) -> None:
    for name in MODEL:
        remote.put(BUCKET, f"{P}models/m1/{name}", b"m")


def peer_bench(remote: FakeRemote) -> None:
    """../shared/peer-bench's dataset: a model and 10,000 app files in 100 folders."""
    model_folder(remote)
    for i in range(10_000):
        remote.put(BUCKET, f"{P}many/d{i % 100:03d}/f{i:05d}.bin", b"a")


def siblings(remote: FakeRemote) -> None:
    """20,000 sibling folders of one file each."""
    for i in range(20_000):
        remote.put(BUCKET, f"{P}d{i:05d}/f.bin", b"s")


def keys_of(remote: FakeRemote) -> list[str]:
    return sorted(k for b, k in remote.objects if b == BUCKET and k.startswith(P))


def listed_keys(catalog: Catalog) -> list[str]:
    return sorted(o.key for o in catalog.tree.files())


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lister, "RETRY_BASE_S", 0.01)


# (shape, most requests for the first listing, requests for a refresh).
# Before: 3, 104 and 20,020 requests, each time (one LIST per folder).  A
# first listing of peer-bench costs 14-17: where the single walk is when the
# folders are known varies; at worst a partial page per range more.
SHAPES = [(model_folder, 1, 1), (peer_bench, 22, 11), (siblings, 22, 20)]


@pytest.mark.parametrize(("shape", "first_at_most", "refresh"), SHAPES, ids=[s[0].__name__ for s in SHAPES])
@trio_test
async def test_a_listing_costs_about_one_request_per_1000_keys(remote: FakeRemote, shape, first_at_most: int,
                                                               refresh: int) -> None:
    shape(remote)
    catalog = Catalog(remote, [Source(BUCKET, P)])
    await catalog.refresh()
    first = remote.count("LIST")
    assert listed_keys(catalog) == keys_of(remote)
    assert first <= first_at_most, f"the first listing cost {first} requests"
    await catalog.refresh()
    assert remote.count("LIST") - first == refresh
    assert listed_keys(catalog) == keys_of(remote)


def awkward_shape(remote: FakeRemote, rng: random.Random) -> None:
    """Folders of random sizes and depths, and keys that sort around folder
    names: "d1" beside "d1/", "d1-x", "d1.txt", a "d2/" marker, non-ASCII."""
    for d in range(rng.randrange(1, 40)):
        folder = f"{P}{rng.choice('abcd')}{d}"
        for name in ("", "-x", ".txt"):
            if rng.random() < 0.2:
                remote.put(BUCKET, folder + name, b"k")
        if rng.random() < 0.2:
            remote.put(BUCKET, folder + "/", b"")
        for f in range(rng.choice([0, 1, 5, 300, 1500])):
            sub = rng.choice(["", "x/", "y/z/", "é/"])
            remote.put(BUCKET, f"{folder}/{sub}f{f:05d}", b"f")


@pytest.mark.parametrize("seed", range(8))
@trio_test
async def test_listings_see_every_key_once_whatever_the_shape(remote: FakeRemote, seed: int) -> None:
    rng = random.Random(seed)
    awkward_shape(remote, rng)
    remote.put(BUCKET, "outside/x", b"o")
    folder = lister.Lister(remote, trio.CapacityLimiter(lister.MAX_RANGES))
    listed = await folder.list_folder(Source(BUCKET, P))
    assert [o.key for o in listed] == keys_of(remote), "every key once, in key order"
    # The next listing splits where this one did; the folder has changed since.
    keys = keys_of(remote)
    for key in rng.sample(keys, min(len(keys), 50)):
        remote.delete(BUCKET, key)
    awkward_shape(remote, rng)
    listed = await folder.list_folder(Source(BUCKET, P))
    assert [o.key for o in listed] == keys_of(remote)


@trio_test
async def test_a_refresh_that_finds_nothing_changed_keeps_the_tree(remote: FakeRemote) -> None:
    peer_bench(remote)
    catalog = Catalog(remote, [Source(BUCKET, P)])
    await catalog.refresh()
    tree = catalog.tree
    assert not await catalog.refresh() and catalog.tree is tree and catalog.last.ok
    remote.put(BUCKET, f"{P}many/d007/f00007.bin", b"changed")
    diff = await catalog.refresh()
    assert [new.key for _, new in diff.changed] == [f"{P}many/d007/f00007.bin"] and catalog.tree is not tree


@trio_test
async def test_a_split_while_a_page_is_in_flight_loses_and_repeats_nothing(remote: FakeRemote) -> None:
    peer_bench(remote)
    held = Gate("second page")
    second_pages: list[Call] = []

    def hold_the_first_walk(call: Call) -> None:
        # The single walk's second page (a token, no delimiter) waits until
        # the walk has been split and the new ranges have listed.
        if not call.delimiter and call.token and not second_pages:
            second_pages.append(call)
            held.wait()

    remote.on_list.append(hold_the_first_walk)
    catalog = Catalog(remote, [Source(BUCKET, P)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(catalog.refresh)
        await wait_for(lambda: held.waiting, "the walk's second page")
        await wait_for(lambda: sum(1 for c in remote.lists() if c.after) >= 3, "the split ranges")
        held.release()
    assert listed_keys(catalog) == keys_of(remote)


@trio_test
async def test_one_failed_request_is_retried_not_the_whole_listing(remote: FakeRemote, quick_retries) -> None:
    peer_bench(remote)
    catalog = Catalog(remote, [Source(BUCKET, P)])
    await catalog.refresh()
    baseline = remote.count("LIST")
    failed: list[Call] = []

    def throttle_the_fifth(call: Call) -> None:
        if remote.count("LIST") == baseline + 5 and not failed:
            failed.append(call)
            raise RemoteUnavailable("s3://bkt/p/: object store kept failing (SlowDown: Reduce your request rate)")

    remote.on_list.append(throttle_the_fifth)
    remote.put(BUCKET, f"{P}many/d050/f00050.bin", b"a new version")
    retries = STATS.retries
    diff = await catalog.refresh()
    assert failed and catalog.last.ok
    assert STATS.retries - retries == 1, "the metrics count lazyfs's retry of the request"
    assert [new.key for _, new in diff.changed] == [f"{P}many/d050/f00050.bin"]
    assert listed_keys(catalog) == keys_of(remote)
    assert remote.count("LIST") - baseline == 11 + 1, "one retry, nothing listed again"


@trio_test
async def test_a_request_that_keeps_failing_fails_the_listing_and_keeps_the_tree(remote: FakeRemote,
                                                                                quick_retries) -> None:
    peer_bench(remote)
    catalog = Catalog(remote, [Source(BUCKET, P)])
    await catalog.refresh()
    before = catalog.tree

    def always(call: Call) -> None:
        if call.after or call.token:  # every page but the very first
            raise RemoteUnavailable("s3://bkt/p/: object store kept failing (503)")

    remote.on_list.append(always)
    with pytest.raises(RemoteUnavailable):
        await catalog.refresh()
    assert catalog.tree is before and not catalog.last.ok and "503" in catalog.last.error


@trio_test
async def test_access_denied_is_not_retried(remote: FakeRemote, quick_retries) -> None:
    model_folder(remote)

    def deny(call: Call) -> None:
        raise AccessDenied("access denied to s3://bkt/p/")

    remote.on_list.append(deny)
    with pytest.raises(AccessDenied):
        await Catalog(remote, [Source(BUCKET, P)]).refresh()
    assert remote.count("LIST") == 1


class IgnoresStartAfter(FakeRemote):
    """A store that lists from the start whatever StartAfter says.  Until a
    request with StartAfter arrives, the first walk's later pages wait (up to
    5 s), so the first listing splits before its single walk could finish
    alone, however loaded the machine."""

    def __init__(self) -> None:
        super().__init__()
        self.asked_start_after = threading.Event()

    def list_page(self, bucket: str, prefix: str, *, delimiter: bool = False, start_after: str = "",
                  token: str | None = None, max_keys: int = 1000):  # type: ignore[no-untyped-def]
        if start_after and not token:
            self.asked_start_after.set()
        elif token and not delimiter:
            self.asked_start_after.wait(5)
        return super().list_page(bucket, prefix, delimiter=delimiter, token=token, max_keys=max_keys)


@trio_test
async def test_a_store_that_ignores_start_after_still_lists_everything() -> None:
    remote = IgnoresStartAfter()
    peer_bench(remote)
    catalog = Catalog(remote, [Source(BUCKET, P)])
    await catalog.refresh()
    assert listed_keys(catalog) == keys_of(remote)
    assert catalog.lister.flat_only
    before = remote.count("LIST")
    await catalog.refresh()
    assert listed_keys(catalog) == keys_of(remote) and remote.count("LIST") - before == 11


@trio_test
async def test_lookups_and_reads_do_not_queue_behind_a_refresh(remote: FakeRemote, stores) -> None:
    """The bulk listing of two big folders is held at the object store; a
    lookup of the model (which lists its own name) and a read of it go on.
    Before, the listing's requests took every thread of trio's default pool,
    which the lookup needed too."""
    sources = [Source(BUCKET, "a/"), Source(BUCKET, "b/")]
    for s in sources:
        for i in range(1200):
            remote.put(BUCKET, f"{s.prefix}d{i % 40:02d}/f{i:05d}", b"x")
    weights = os.urandom(300_000)
    remote.put(BUCKET, "a/llm/model.bin", weights)
    held = Gate("bulk listing")
    passed = []
    lock = threading.Lock()

    def hold_the_bulk(call: Call) -> None:
        if not call.key.endswith("/"):
            return  # a lookup lists its own name
        with lock:
            first = len(passed) < len(sources)
            passed.append(call)
        if not first:
            held.wait()

    remote.on_list.append(hold_the_bulk)
    catalog = Catalog(remote, sources)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher), trio.open_nursery() as nursery:
        nursery.start_soon(catalog.refresh)
        await wait_for(lambda: held.waiting, "the bulk listing to be held")
        await trio.sleep(0.2)  # every request it can start is started
        with trio.fail_after(5):
            obj = await catalog.lookup("a/llm", "model.bin")
            assert isinstance(obj, RemoteObject)
            handles = Handles(fetcher)
            fh = await handles.open(obj)
            assert bytes(await handles.read(fh, 0, 4096)) == weights[:4096]
            handles.release(fh)
        assert not catalog.live
        held.release()
    assert catalog.live and catalog.tree.objects == 2401


@trio_test
async def test_a_refresh_that_keeps_failing_logs_once_then_once_a_minute_then_its_recovery(
        remote: FakeRemote, quick_retries, caplog: pytest.LogCaptureFixture) -> None:
    """Each failed refresh logged three lines (two WARNINGs for the retries of
    its listing request, one ERROR), none held back: an endpoint down for ten
    minutes, 90 lines.  Now: the failure once, a line a minute counting the
    ones not shown, and one line when a listing succeeds again."""
    model_folder(remote)
    now = [0.0]
    catalog = Catalog(remote, [Source(BUCKET, P)])
    refresher = Refresher(catalog, 60, lines=RepeatedLines(clock=lambda: now[0]))
    assert await refresher.refresh_once() is not None

    def refused(call: Call) -> None:
        raise RemoteUnavailable(f"s3://{BUCKET}/{P}: could not connect to http://127.0.0.1:9/{BUCKET} "
                                f"after {now[0]:.0f} s")

    remote.on_list.append(refused)
    caplog.clear()
    caplog.set_level(logging.INFO)
    for _ in range(6):  # a minute of refreshes every 10 s
        assert await refresher.refresh_once() is None
        now[0] += 10
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.levelname for r in shown] == ["ERROR"], [r.getMessage() for r in shown]
    assert "listing failed: " in shown[0].getMessage()
    assert remote.count("LIST") > 6 * 3 - 1, "each refresh's request was not retried"
    caplog.clear()
    for _ in range(6):  # the next minute: one line, counting the five not shown
        assert await refresher.refresh_once() is None
        now[0] += 10
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(shown) == 1 and "(5 more like it in the last 60 s)" in shown[0].getMessage(), \
        [r.getMessage() for r in shown]
    caplog.clear()
    remote.on_list.remove(refused)
    assert await refresher.refresh_once() is not None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == [
        "listing succeeded again after 12 failed attempts"]


@trio_test
async def test_a_refresh_refused_access_is_a_warning_not_an_error(
        remote: FakeRemote, quick_retries, caplog: pytest.LogCaptureFixture) -> None:
    """`--refresh` with a token that expired: the listing is refused.  The
    credentials' or the bucket policy's doing, not lazyfs failing: the
    README's Logs section says access denied is one WARNING line (it was
    `ERROR lazyfs.refresher: listing failed: access denied ...`)."""
    model_folder(remote)
    catalog = Catalog(remote, [Source(BUCKET, P)])
    refresher = Refresher(catalog, 60)
    assert await refresher.refresh_once() is not None

    def denied(call: Call) -> None:
        raise AccessDenied(f"access denied to s3://{BUCKET}/{P} (ExpiredToken: The provided token has expired.)")

    remote.on_list.append(denied)
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert await refresher.refresh_once() is None
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [(r.levelname, r.name) for r in shown] == [("WARNING", "lazyfs.refresher")], \
        [r.getMessage() for r in shown]
    assert "listing failed: access denied" in shown[0].getMessage()
