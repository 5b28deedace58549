"""Unit tests: inode numbers stay the same for the life of a mount (the kernel
forgets inodes and looks them up again), a new version gets a new one, none
is ever reused, and what is kept for forgotten inodes follows the listing."""

from __future__ import annotations

import gc
import tracemalloc

from lazyfs.inodes import InodeTable, listed_in, ref_of
from lazyfs.namespace import RemoteObject, Tree, build_tree


def obj(key: str, etag: str = "e", size: int = 1) -> RemoteObject:
    return RemoteObject("b", key, size, etag, 10)


class Listing:
    """The served listing as the mount's table sees it (fuse_ops: the catalog's tree)."""

    def __init__(self, *objects: RemoteObject) -> None:
        self.tree = build_tree(objects)

    def serve(self, *objects: RemoteObject) -> None:
        self.tree = build_tree(objects)

    def table(self) -> InodeTable:
        return InodeTable(lambda ref: listed_in(self.tree, ref))


def test_a_forgotten_folder_and_file_come_back_with_the_same_number() -> None:
    """Before: the kernel forgetting an inode (memory pressure, drop_caches)
    gave the same file a new st_ino on its next lookup (4 -> 7), breaking
    tar --listed-incremental, rsync -H and find's loop check."""
    f = obj("d/sub/f.txt")
    listing = Listing(f)
    table = listing.table()
    folder, file = table.lookup("d/sub"), table.lookup(f)
    assert table.forget(file, 1) and table.forget(folder, 1)
    assert table.get(file) is None and table.kept() == 2
    # The next listing's object is another instance of the same version.
    listing.serve(obj("d/sub/f.txt"))
    assert table.lookup(obj("d/sub/f.txt")) == file
    assert table.lookup("d/sub") == folder
    assert table.kept() == 0 and table.get(file) == f


def test_the_same_content_under_the_same_key_is_the_same_inode_whatever_its_date() -> None:
    table = Listing(obj("a")).table()
    ino = table.lookup(obj("a"))
    table.forget(ino, 1)
    assert table.lookup(RemoteObject("b", "a", 1, "e", 99)) == ino


def test_a_new_version_gets_a_new_number_and_the_old_one_is_never_reused() -> None:
    v1, v2 = obj("a", etag="1"), obj("a", etag="2")
    listing = Listing(v1)
    table = listing.table()
    old = table.lookup(v1)
    listing.serve(v2)  # replaced in S3, seen by a refresh
    new = table.lookup(v2)
    assert new != old
    table.forget(old, 1)  # the kernel lets go of the old version
    assert table.kept() == 0, "a number kept for a version no longer listed"
    seen = {old, new}
    for i in range(20):  # whatever comes next, never an old number
        ino = table.lookup(obj(f"n{i}"))
        assert ino not in seen
        seen.add(ino)
    listing.serve(v1)  # the old content back: a new inode (its pages may be gone or wrong)
    assert table.lookup(v1) not in seen


def test_a_refresh_drops_the_numbers_kept_for_what_it_took_away() -> None:
    keep, gone = obj("p/keep"), obj("q/gone")
    listing = Listing(keep, gone)
    table = listing.table()
    numbers = {ref: table.lookup(ref) for ref in ("p", "q", keep, gone)}
    for ino in numbers.values():
        table.forget(ino, 1)
    assert table.kept() == 4
    listing.serve(keep)
    table.drop_unlisted([gone, "q"])
    assert table.kept() == 2
    assert table.lookup(keep) == numbers[keep] and table.lookup("p") == numbers["p"]
    assert table.lookup("q") not in numbers.values(), "a folder that vanished comes back as a new one"


def test_a_refresh_keeps_the_number_of_what_it_listed_again() -> None:
    """A folder that vanished and came back within one refresh, or a version
    swapped back: listed now, so its number stays."""
    a = obj("p/a")
    listing = Listing(a)
    table = listing.table()
    ino = table.lookup(a)
    table.forget(ino, 1)
    table.drop_unlisted([a, "p"])
    assert table.lookup(a) == ino


def test_what_an_inode_stands_for_and_whether_it_is_listed() -> None:
    a = obj("p/a")
    tree: Tree = build_tree([a])
    p = tree.find("p")
    assert p is not None and ref_of(p) == "p" and ref_of(a) is a
    assert listed_in(tree, "p") and listed_in(tree, "") and listed_in(tree, obj("p/a"))
    assert not listed_in(tree, "p/a"), "a file is no folder"
    assert not listed_in(tree, obj("p/a", etag="2")) and not listed_in(tree, obj("p/b"))
    assert listed_in(tree, ("status",)), "lazyfs's own files are always there"


def test_a_kept_number_costs_little() -> None:
    """A mount of millions of objects that `find` walked once keeps a number
    for each forgotten inode: under 160 bytes (measured: ~100), beside the
    ~440 bytes per listed object (test_namespace)."""
    n = 50_000
    objects = [RemoteObject("models", f"download/files/from/my-model/v3/d{i // 1000:03d}/shard-{i:06d}.bin",
                            4096 + i, f"{i:032x}", 1_700_000_000_000_000_000 + i) for i in range(n)]
    table = InodeTable()
    numbers = [table.lookup(o) for o in objects]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for ino in numbers:
            table.forget(ino, 1)
        gc.collect()
        per_number = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert table.kept() == n and len(table) == 1
    print(f"{per_number:.0f} bytes per kept number")
    assert per_number < 160, f"{per_number:.0f} bytes per kept number"
