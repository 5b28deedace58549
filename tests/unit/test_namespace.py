"""Unit tests: key-to-path mapping, unsafe-key rejection, tree snapshots, inodes."""

from __future__ import annotations

import pytest

from lazyfs.errors import UnsafeKey
from lazyfs.inodes import ROOT_INODE, InodeTable
from lazyfs.namespace import DirNode, RemoteObject, build_tree, diff_trees, key_parts


def obj(key: str, size: int = 1, etag: str = "e", bucket: str = "b", mtime: int = 10) -> RemoteObject:
    return RemoteObject(bucket=bucket, key=key, size=size, etag=etag, mtime_ns=mtime)


def test_key_parts_accepts_ordinary_keys() -> None:
    assert key_parts("download/files/from/llm/model.bin") == ("download", "files", "from", "llm", "model.bin")
    assert key_parts("a/ünïcödé name (1).bin")[-1] == "ünïcödé name (1).bin"
    assert key_parts("a/" + "n" * 255)[-1] == "n" * 255
    assert key_parts("a/line\u2028para\u2029.bin")[-1] == "line\u2028para\u2029.bin", "separators, not controls"


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/./b", "a/../b", "..", "a/b/", "a/" + "n" * 256,
                                 "a/\x01b", "a/b\x7f", "a/b\x80", "a/\x85b", "a/b\x9b[2J", "a/\x9f",
                                 ".lazyfs/x", "a/\udcff", "a/\ud800x"])
def test_key_parts_rejects_unsafe_keys(key: str) -> None:
    with pytest.raises(UnsafeKey):
        key_parts(key)


def test_tree_layout_and_sorted_names() -> None:
    t = build_tree([obj("p/b.txt", 3, mtime=5), obj("p/a/x.bin", 7, mtime=9), obj("p/a/y.bin", 1)],
                   folders=["p/", "p/empty/"])
    assert t.objects == 3 and t.total_bytes == 11
    p = t.find("p")
    assert isinstance(p, DirNode) and p.names == ("a", "b.txt", "empty") and p.nsubdirs == 2
    assert t.find("p/a/x.bin") == obj("p/a/x.bin", 7, mtime=9)
    assert t.find("p/a").mtime_ns == 10  # newest file below
    assert t.find("p/missing") is None and t.find("p/b.txt/x") is None
    assert sorted(o.key for o in t.files()) == ["p/a/x.bin", "p/a/y.bin", "p/b.txt"]
    assert t.find("") is t.root


def test_tree_skips_unsafe_conflicting_and_duplicate_keys() -> None:
    t = build_tree([obj("p/both"), obj("p/both/inner"), obj("p/../esc"), obj("p/x", bucket="one"),
                    obj("p/x", bucket="two"), obj("p/dir/")])
    reasons = {s.key: s.reason for s in t.skipped}
    assert "both a file and a folder" in reasons["p/both"]
    assert "'..'" in reasons["p/../esc"]
    assert "s3://one/p/x" in reasons["p/x"]
    assert isinstance(t.find("p/both"), DirNode)
    assert isinstance(t.find("p/dir"), DirNode)  # a folder marker object makes a folder
    assert t.find("p/x").bucket == "one"
    # the file listed after its folder is skipped just the same
    t2 = build_tree([obj("q/both/inner"), obj("q/both")])
    assert isinstance(t2.find("q/both"), DirNode) and len(t2.skipped) == 1


def test_a_folder_marker_with_a_body_is_said_to_be_skipped_as_other_keys_are() -> None:
    """Its folder is shown and its body is not: that was dropped with no
    warning, while every other key not shown is warned of."""
    t = build_tree([obj("k/marker/", size=24), obj("k/empty/", size=0), obj("k/marker/x.bin")])
    assert isinstance(t.find("k/marker"), DirNode) and isinstance(t.find("k/empty"), DirNode)
    assert [(s.key, s.reason) for s in t.skipped] == [
        ("k/marker/", "is a folder marker with a body (24 bytes): the folder is shown, the body is not")]


def test_diff_trees() -> None:
    old = build_tree([obj("p/same"), obj("p/changed", etag="1"), obj("p/gone")])
    new = build_tree([obj("p/same"), obj("p/changed", etag="2"), obj("p/new")])
    d = diff_trees(old, new)
    assert [o.key for o in d.added] == ["p/new"]
    assert [o.key for o in d.removed] == ["p/gone"]
    assert [(a.etag, b.etag) for a, b in d.changed] == [("1", "2")]
    assert d.folders == ()  # "p" is a folder before and after: its name means the same
    assert not diff_trees(new, new)


def test_diff_trees_names_the_folders_that_appeared_or_vanished() -> None:
    old = build_tree([obj("p/a"), obj("p/old/deep/f"), obj("p/x")])
    new = build_tree([obj("p/a"), obj("p/new/deep/f"), obj("p/x/y")])
    assert diff_trees(old, new).folders == ("p/new", "p/new/deep", "p/old", "p/old/deep", "p/x")


def test_diff_trees_names_every_folder_above_whose_date_moved() -> None:
    """A folder is dated by its newest file anywhere below: a file added deep
    down redates each folder above it, the root too, and none beside."""
    old = build_tree([obj("a/b/c/f", mtime=10), obj("a/x/g", mtime=30), obj("z/h", mtime=10)])
    new = build_tree([obj("a/b/c/f", mtime=10), obj("a/x/g", mtime=30), obj("z/h", mtime=10),
                      obj("a/b/c/deep/new.py", mtime=20)])
    assert diff_trees(old, new).redated == ("a/b", "a/b/c")  # "a" and the root stay 30 (a/x/g)
    newer = build_tree([obj("a/b/c/f", mtime=10), obj("a/x/g", mtime=30), obj("z/h", etag="2", mtime=40)])
    assert diff_trees(old, newer).redated == ("", "z")  # a new version redates too
    again = build_tree([obj("a/b/c/f", mtime=10), obj("a/x/g", mtime=30), obj("z/h", mtime=40)])
    assert diff_trees(old, again).redated == ("", "z")  # and the same bytes uploaded again (no change else)


def test_diff_trees_names_the_files_uploaded_again_with_the_same_bytes() -> None:
    """Same ETag and size, a new date: no change (the same inode and pages),
    but the new entry, so the file's `stat` shows its new date."""
    old = build_tree([obj("z/h", mtime=10), obj("z/k", mtime=10), obj("z/n", mtime=10)])
    new = build_tree([obj("z/h", mtime=40), obj("z/k", etag="2", mtime=40), obj("z/n", mtime=10)])
    diff = diff_trees(old, new)
    assert diff.retouched == (obj("z/h", mtime=40),)
    assert [n for _, n in diff.changed] == [obj("z/k", etag="2", mtime=40)]
    assert diff and not diff_trees(old, old)


def test_inodes_are_per_version_and_forgotten_at_zero() -> None:
    v1, v2 = obj("p/f", etag="1"), obj("p/f", etag="2")
    table = InodeTable(lambda ref: ref != v1)  # v2 replaced v1 in the listing
    a = table.lookup(v1)
    assert table.lookup(v1) == a and table.get(a) == v1
    b = table.lookup(v2)
    assert b != a, "a new version of a path must get a new inode"
    d = table.lookup("p")
    assert table.get(d) == "p" and table.lookup("p") == d
    table.forget(a, 1)
    assert table.get(a) == v1
    table.forget(a, 1)
    assert table.get(a) is None
    assert table.lookup(v1) not in (a, b), "numbers are never reused"
    table.forget(ROOT_INODE, 5)
    table.forget(12345, 1)  # unknown: ignored, never raises
    assert table.get(ROOT_INODE) == ""


def test_memory_per_known_object_stays_small() -> None:
    """What a listed object costs while the mount knows it (README: listing at scale)."""
    import gc
    import tracemalloc

    n = 100_000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        # Fresh strings per object, as the listing parser makes them.
        objects = [RemoteObject("models", f"download/files/from/my-model/v3/d{i // 1000:03d}/shard-{i:06d}.bin",
                                4096 + i, f"{i:032x}", 1_700_000_000_000_000_000 + i) for i in range(n)]
        tree = build_tree(objects, folders=["download/files/from/my-model/v3"])
        del objects
        gc.collect()
        per_object = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert tree.objects == n
    print(f"{per_object:.0f} bytes per known object")
    assert per_object < 800, f"{per_object:.0f} bytes per known object"
