"""What a warm-up (and so `lazyfs bake`) counts: a file made current by
linking the same bytes the store holds under another path (its content
index) is counted as linked, apart from one that was already current."""

from __future__ import annotations

import os

from lazyfs.fetch import Fetcher
from lazyfs.prefetch import Prefetcher
from support.enginekit import BUCKET, fetch_config, running, trio_test
from support.fakeremote import FakeRemote


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
