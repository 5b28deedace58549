"""Inode numbers and the kernel's lookup counts.  Synchronous and pure.

A directory's inode stands for its *path*: its contents come from whichever
snapshot is current.  A file's inode stands for one object *version*
(bucket, key, ETag, size): when a refresh finds a new version at the same path
it gets a new inode, so the kernel can never serve the old version's cached
pages or attributes under the new one, while handles opened on the old inode
keep reading the old version.

A number is stable for the life of the mount: the kernel forgets inodes
under memory pressure and looks them up again, and tools that remember
(st_dev, st_ino) (`tar --listed-incremental`, `rsync -H`, `find`'s loop
check, backup dedup) must see the same number for the same folder or file
version.  So a forgotten inode's number is kept while the served listing
still has what it stands for, in `_kept`: a 128-bit digest of the identity
to the number, about 120 bytes per entry, no strings (which a refresh would
otherwise keep alive twice).  Numbers of versions and folders no longer
listed are dropped, once the kernel has forgotten them too (`forget`) or when
a refresh takes them away (`drop_unlisted`), so memory follows the listing.
Numbers are never reused, so generation 0 is always right.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

from lazyfs.namespace import DirNode, Node, RemoteObject, Tree

ROOT_INODE = 1

# What an inode stands for: a directory path, a file version, or a virtual
# file of lazyfs's own (a tuple naming it).
InodeRef = str | RemoteObject | tuple[str, ...]


def ident_of(ref: InodeRef) -> tuple[object, ...]:
    if isinstance(ref, RemoteObject):
        return ("f", *ref.version)
    if isinstance(ref, str):
        return ("d", ref)
    return ("v",) + ref


def ref_of(node: Node | tuple[str, ...]) -> InodeRef:
    """What a tree node's inode stands for."""
    return node.path if isinstance(node, DirNode) else node


def listed_in(tree: Tree, ref: InodeRef) -> bool:
    """Does the snapshot still present `ref`: a folder at its path, this very
    version at its key?  (lazyfs's own files always are.)"""
    if isinstance(ref, RemoteObject):
        node = tree.find(ref.key)
        return isinstance(node, RemoteObject) and node.version == ref.version
    if isinstance(ref, str):
        return isinstance(tree.find(ref), DirNode)
    return True


def _digest(ident: tuple[object, ...]) -> int:
    # 128 bits: two identities sharing one would take ~2^64 of them.  repr
    # keeps the fields apart whatever characters they hold.
    return int.from_bytes(hashlib.blake2b(repr(ident).encode(), digest_size=16).digest(), "little")


class InodeTable:
    def __init__(self, listed: Callable[[InodeRef], bool] = lambda ref: True) -> None:
        self._listed = listed  # is `ref` in the served listing?
        self._ino_of: dict[tuple[object, ...], int] = {ident_of(""): ROOT_INODE}
        self._ref: dict[int, InodeRef] = {ROOT_INODE: ""}
        self._lookups: dict[int, int] = {}
        self._kept: dict[int, int] = {}  # digest of a forgotten identity -> its number
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        """Inodes the kernel may know."""
        return len(self._ref)

    def kept(self) -> int:
        """Numbers kept for listed things the kernel has forgotten."""
        return len(self._kept)

    def ino(self, ref: InodeRef) -> int:
        """The inode number for `ref`: the one it had if it had one, else a
        new one; not counted."""
        ident = ident_of(ref)
        ino = self._ino_of.get(ident)
        if ino is None:
            ino = self._kept.pop(_digest(ident), None) if self._kept else None
            if ino is None:
                ino = self._next
                self._next += 1
            self._ino_of[ident] = ino
            self._ref[ino] = ref
        return ino

    def peek(self, ref: InodeRef) -> int | None:
        """The inode number `ref` already has, if the kernel knows it."""
        return self._ino_of.get(ident_of(ref))

    def renew(self, obj: RemoteObject) -> int | None:
        """A refresh lists `obj` for a version the table may know, with a new
        listing entry (the same bytes uploaded again: a new Last-Modified):
        its inode stands for the new entry from now on, so its attributes
        show the new date.  The inode number, if the kernel knows it."""
        ino = self._ino_of.get(ident_of(obj))
        if ino is not None:
            self._ref[ino] = obj
        return ino

    def lookup(self, ref: InodeRef) -> int:
        """Count one kernel reference (a lookup reply or a readdirplus entry)."""
        ino = self.ino(ref)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return ino

    def get(self, ino: int) -> InodeRef | None:
        return self._ref.get(ino)

    def forget(self, ino: int, nlookup: int) -> bool:
        """Drop `nlookup` references; at zero the kernel no longer knows the
        inode (True), and its number is kept only if what it stands for is
        still listed.  Never raises: a forget for an unknown inode (already
        dropped) is ignored."""
        if ino == ROOT_INODE:
            return False
        left = self._lookups.get(ino, 0) - nlookup
        if left > 0:
            self._lookups[ino] = left
            return False
        self._lookups.pop(ino, None)
        ref = self._ref.pop(ino, None)
        if ref is None:
            return False
        ident = ident_of(ref)
        if self._ino_of.get(ident) == ino:
            del self._ino_of[ident]
            if self._listed(ref):
                self._kept[_digest(ident)] = ino
        return True

    def drop_unlisted(self, refs: Iterable[InodeRef]) -> None:
        """A refresh took these away: drop the numbers kept for those of them
        no longer listed (a number the kernel still holds is dropped when it
        forgets it)."""
        if not self._kept:
            return
        for ref in refs:
            if not self._listed(ref):
                self._kept.pop(_digest(ident_of(ref)), None)
