"""A listed object the object store answers 404 for (a GET, confirmed by a
HEAD): its name goes at once, and comes back as soon as the store finds it
again, never later than the next listing that names it.  Against the
in-memory store, whose `not_found` keys are listed but answer 404 to GETs and
HEADs, as SeaweedFS's do for a while after a link flap."""

from __future__ import annotations

from lazyfs.catalog import Catalog
from lazyfs.modeljson import Source
from support.enginekit import BUCKET, trio_test
from support.fakeremote import FakeRemote

SOURCE = Source(BUCKET, "m/")


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
    assert (await catalog.recheck(flaky)).removed == (flaky,)
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
    assert (await catalog.recheck(gone)).removed == (gone,)
    diff = await catalog.refresh()
    assert catalog.tree.find(gone.key) is None and not diff.added and not diff.removed
