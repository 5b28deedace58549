"""What a warm-up (and so `lazyfs bake`) counts: a file made current by
linking the same bytes the store holds under another path (its content
index) is counted as linked, apart from one that was already current; the
bytes a bake calls downloaded are those of the files it kept."""

from __future__ import annotations

import io
import os

from lazyfs import bake
from lazyfs.errors import ObjectChanged
from lazyfs.fetch import Fetcher
from lazyfs.prefetch import Prefetcher
from support.enginekit import BUCKET, fetch_config, running, trio_test
from support.fakeremote import Call, FakeRemote


@trio_test
async def test_files_linked_from_identical_bytes_are_counted_apart_from_those_already_current(
        remote: FakeRemote, stores) -> None:
    shared = {name: os.urandom(2000 + i) for i, name in enumerate(("a.bin", "b.bin"))}
    v1 = [remote.put(BUCKET, f"v1/{name}", data) for name, data in shared.items()]
    v2 = [remote.put(BUCKET, f"v2/{name}", data) for name, data in shared.items()]  # same ETags, new paths
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        first = await Prefetcher(fetcher).run(v1)
        gets = len(remote.gets())
        second = await Prefetcher(fetcher).run(v2)
        third = await Prefetcher(fetcher).run(v2)
    assert (first.done_files, first.local_files, first.linked_files) == (2, 0, 0)
    assert len(remote.gets()) == gets, "the second version's files were downloaded, not linked"
    assert (second.done_files, second.local_files, second.linked_files) == (2, 2, 2)
    assert (third.done_files, third.local_files, third.linked_files) == (2, 2, 0), "already current by now"


@trio_test
async def test_a_bake_counts_as_downloaded_the_bytes_of_the_files_it_kept_not_those_of_a_failed_one(
        remote: FakeRemote, stores) -> None:
    """A file overwritten mid-bake fails after its first part came in; a
    100-byte file is kept.  The summary said "1 downloaded (4.0 MiB)": the
    failed file's discarded bytes."""
    big = remote.put(BUCKET, "m/big.bin", os.urandom(8 * 256 * 1024))
    small = remote.put(BUCKET, "m/c.json", b"x" * 100)

    def overwritten_after_the_first_part(call: Call) -> None:
        if call.key == big.key and call.start > 0:
            remote.fail_gets.setdefault(big.key, []).append(ObjectChanged("m/big.bin changed"))

    remote.on_get.append(overwritten_after_the_first_part)
    fetcher = Fetcher(remote, stores(), fetch_config(max_connections=1))
    result = await bake._fetch_all(fetcher, [big, small], io.StringIO(), bake.Baking())
    assert result.downloaded == 1 and [uri for uri, _ in result.failed] == [big.uri]
    assert result.bytes_downloaded == 100
    assert result.bytes_fetched >= 256 * 1024 + 100, "the failed file's first part was fetched"


@trio_test
async def test_a_file_a_mount_fetched_and_a_bake_found_current_is_baked_never_evicted(
        remote: FakeRemote, stores) -> None:
    """A mount with a cache budget fetched the files; a bake into the same
    store found them current ("already current") and left them recorded as
    fetched, so the mount's budget evicted them later and the store a
    readiness probe had passed was no longer complete.  The bake records
    them as its own now: an eviction passes them over."""
    objs = [remote.put(BUCKET, f"m/{n}.bin", os.urandom(3000)) for n in "ab"]
    store = stores()
    mount = Fetcher(remote, store, fetch_config())  # origin "fetch", as a mount's
    async with running(mount):
        await Prefetcher(mount).run(objs[:1])
    baker = Fetcher(remote, store, fetch_config(), origin="bake")
    async with running(baker):
        progress = await Prefetcher(baker, must_keep=True).run(objs)
    assert (progress.done_files, progress.local_files) == (2, 1)
    assert store.evict([o.key for o in objs]) == 0, "a file the bake counted was evicted"
    assert all(os.path.exists(os.path.join(store.root.path, o.key)) for o in objs)
