"""A mount that started offline going live when its first listing finds what
the store knew.  The saved listing keeps no checksum algorithm, so the live
entries of objects uploaded with a checksum (boto3's default since 1.36)
differ from the saved ones in that field alone; every going-live logged
`listing changed: 0 added, 0 removed, 0 changed (new dates only)`, noise
that said "changed" of an unchanged bucket.  Now it says what a refresh that
finds nothing says (nothing); "(new dates only)" is kept for dates that did
move (the same bytes uploaded again), and real changes are counted as ever."""

from __future__ import annotations

import logging
from typing import Any

from lazyfs.catalog import Catalog
from lazyfs.modeljson import Source
from lazyfs.namespace import Diff
from lazyfs.offline import offline_objects
from lazyfs.refresher import Refresher
from support.enginekit import BUCKET, trio_test
from support.fakeremote import FakeRemote

SOURCE = Source(BUCKET, "m/")


async def offline_then_live(remote: FakeRemote, stores: Any, caplog: Any, while_offline: Any = None) -> list[Diff]:
    """A mount's listing saved, a new start offline from the store, then the first try of the listing."""
    store = stores()
    await Catalog(remote, [SOURCE], store).refresh()  # saves the listing, as a mount does
    if while_offline is not None:
        while_offline()
    catalog = Catalog(remote, [SOURCE], store)
    catalog.start_offline(offline_objects(store, [SOURCE]), "AWS credentials unavailable: test")
    changes: list[Diff] = []
    caplog.set_level(logging.INFO, logger="lazyfs")
    caplog.clear()
    assert await Refresher(catalog, 0, [changes.append]).refresh_once() is not None
    assert catalog.live and not catalog.offline
    assert "online again, the object store answered: live listing of 2 objects" in caplog.text
    return changes


def changed_lines(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if "listing changed" in r.getMessage()]


@trio_test
async def test_going_live_with_nothing_changed_says_no_change(remote: FakeRemote, stores: Any, caplog: Any) -> None:
    remote.put(BUCKET, "m/a.bin", b"a" * 1000, checksum="CRC32")
    remote.put(BUCKET, "m/b.bin", b"b" * 500, checksum="CRC32")
    changes = await offline_then_live(remote, stores, caplog)
    assert changed_lines(caplog) == []
    # The live entries (with their checksum algorithm) still reach the inodes that stood for the saved ones.
    assert [o.checksum_algorithm for d in changes for o in d.retouched] == ["CRC32", "CRC32"]


@trio_test
async def test_going_live_says_new_dates_when_the_same_bytes_were_uploaded_again(remote: FakeRemote, stores: Any,
                                                                                 caplog: Any) -> None:
    remote.put(BUCKET, "m/a.bin", b"a" * 1000, checksum="CRC32")
    remote.put(BUCKET, "m/b.bin", b"b" * 500, checksum="CRC32")

    def uploaded_again() -> None:
        stored = remote.objects[(BUCKET, "m/a.bin")]
        stored.mtime_ns += 5 * 10**9

    await offline_then_live(remote, stores, caplog, uploaded_again)
    assert changed_lines(caplog) == ["listing changed: 0 added, 0 removed, 0 changed (new dates only)"]


@trio_test
async def test_going_live_counts_what_changed(remote: FakeRemote, stores: Any, caplog: Any) -> None:
    remote.put(BUCKET, "m/a.bin", b"a" * 1000, checksum="CRC32")
    remote.put(BUCKET, "m/b.bin", b"b" * 500, checksum="CRC32")
    await offline_then_live(remote, stores, caplog,
                            lambda: remote.put(BUCKET, "m/b.bin", b"c" * 500, checksum="CRC32"))
    assert changed_lines(caplog) == ["listing changed: 0 added, 0 removed, 1 changed"]
