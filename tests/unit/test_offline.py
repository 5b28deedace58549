"""What an offline start says it can serve (offline.py): the copies an open
will serve, apart from those an open must check by content first."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from lazyfs.modeljson import Source
from lazyfs.namespace import RemoteObject
from lazyfs.offline import OnDisk, offline_objects, store_knows
from lazyfs.store import Store
from support.storefiles import publish

P = "models/m"


def obj(name: str, data: bytes) -> RemoteObject:
    return RemoteObject("bkt", f"{P}/{name}", len(data), hashlib.md5(data).hexdigest(), 1_700_000_000 * 10**9)


def test_unrecorded_copies_count_as_servable_only_where_opens_judge_them_by_size(tmp_path: Path) -> None:
    """Before, a copy of the right size with no record counted as one the mount could serve, also under
    --verify etag, where an open hashes it first and refuses one whose bytes are wrong: the line promised
    files that then failed with EIO."""
    (tmp_path / "layer" / P).mkdir(parents=True)
    (tmp_path / "store" / P).mkdir(parents=True)
    store = Store.open(str(tmp_path / "store"), prebaked=[str(tmp_path / "layer")], create=True)
    try:
        data = {n: n.encode() * 64 for n in ("fetched", "admin", "wrong", "absent", "resized", "both")}
        objs = {n: obj(n, d) for n, d in data.items()}
        publish(store, objs["fetched"], data["fetched"])  # recorded as this version
        (tmp_path / "store" / P / "admin").write_bytes(data["admin"])  # no record, the right bytes
        (tmp_path / "store" / P / "wrong").write_bytes(b"x" * len(data["wrong"]))  # no record, wrong bytes
        (tmp_path / "store" / P / "resized").write_bytes(b"short")
        # An unrecorded copy in the store, a recorded one (baked) in the layer behind it.
        (tmp_path / "store" / P / "both").write_bytes(b"y" * len(data["both"]))
        baker = Store.open(str(tmp_path / "layer"))
        try:
            publish(baker, objs["both"], data["both"], origin="bake")
        finally:
            baker.close()
        store.listings.save("bkt", f"{P}/", objs.values())
        known = store_knows(store, [Source("bkt", f"{P}/")])
        assert len(known.objects) == 6
        by_size = known.on_disk(store, checks_content=False)
        assert by_size == OnDisk(current=4, unchecked=0)  # all but "absent" and "resized", as opens serve them
        by_content = known.on_disk(store, checks_content=True)
        assert by_content == OnDisk(current=2, unchecked=2)  # "fetched", "both" (from the layer); "admin", "wrong"
        # The unchecked copies are on disk too: counted once (before: "2 of them on disk, and 2 more").
        assert by_content.said() == ("4 of them on disk (2 with no identity record, checked by content when "
                                     "opened: one that does not match is not served)")
        assert by_size.said() == "4 of them on disk"
        assert not OnDisk(0, 0) and OnDisk(0, 1)
    finally:
        store.close()


def dated(name: str, data: bytes, mtime_s: int) -> RemoteObject:
    return RemoteObject("bkt", f"{P}/{name}", len(data), hashlib.md5(data).hexdigest(), mtime_s * 10**9)


def test_a_saved_listing_is_the_truth_about_what_exists_offline(tmp_path: Path) -> None:
    """Before: "the saved listings, and local files they do not name": a copy of an object deleted before
    the listing was saved (the store keeps its bytes) came back offline, listed, served and called cached.
    A copy newer than the listing (fetched by a mount that asked the object store for a name the saved
    listing lacked) is still served, and so is a folder's every file when it has no saved listing."""
    (tmp_path / "layer" / P).mkdir(parents=True)
    store = Store.open(str(tmp_path / "store"), prebaked=[str(tmp_path / "layer")], create=True)
    try:
        listed = dated("listed", b"listed", 1_700_000_000)
        gone = dated("gone", b"gone", 1_700_000_000)  # fetched, then deleted from the object store
        publish(store, listed, b"listed")
        publish(store, gone, b"gone")
        (tmp_path / "layer" / P / "admin-old").write_bytes(b"old")  # an admin's copy, no record
        os.utime(tmp_path / "layer" / P / "admin-old", ns=(gone.mtime_ns, gone.mtime_ns))
        source = Source("bkt", f"{P}/")
        # No saved listing (a baked or prebaked store): every file on disk.
        assert [o.key for o in store_knows(store, [source]).objects] == [f"{P}/admin-old", gone.key, listed.key]
        store.listings.save("bkt", f"{P}/", [listed])
        later = dated("later", b"later", int(time.time()) + 60)  # uploaded and fetched after the save
        publish(store, later, b"later")
        known = store_knows(store, [source])
        assert [o.key for o in known.objects] == [later.key, listed.key]
        assert known.left_out == 2  # "gone" and the admin's old copy
        saved = store.listings.load_dated("bkt", f"{P}/")
        assert saved is not None and saved.objects == [listed] and saved.saved_ns < later.mtime_ns
        assert known.on_disk(store, checks_content=False) == OnDisk(current=2)
        assert offline_objects(store, [source]) == known.objects  # what `lazyfs status` reads offline
    finally:
        store.close()


def test_a_listing_saved_by_an_older_lazyfs_is_dated_by_its_file(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"), create=True)
    try:
        store.listings.save("bkt", f"{P}/", [])
        path = next((tmp_path / "store" / ".lazyfs" / "listings").glob("*.json"))
        doc = json.loads(path.read_text())
        del doc["saved_ns"]
        path.write_text(json.dumps(doc))
        os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
        saved = store.listings.load_dated("bkt", f"{P}/")
        assert saved is not None and saved.saved_ns == 1_700_000_000 * 10**9 and saved.objects == []
    finally:
        store.close()
