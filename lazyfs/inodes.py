"""Inode numbers and the kernel's lookup counts.  Synchronous and pure.

A directory's inode stands for its *path*: its contents come from whichever
snapshot is current.  A file's inode stands for one object *version*
(bucket, key, ETag, size): when a refresh finds a new version at the same path
it gets a new inode, so the kernel can never serve the old version's cached
pages or attributes under the new one, while handles opened on the old inode
keep reading the old version.  Numbers are never reused, so generation 0 is
always right.
"""

from __future__ import annotations

from typing import Hashable

from lazyfs.namespace import RemoteObject

ROOT_INODE = 1

# What an inode stands for: a directory path, a file version, or a virtual
# file of lazyfs's own (a tuple naming it).
InodeRef = str | RemoteObject | tuple[str, ...]


def ident_of(ref: InodeRef) -> Hashable:
    if isinstance(ref, RemoteObject):
        return ("f", *ref.version)
    if isinstance(ref, str):
        return ("d", ref)
    return ("v",) + ref


class InodeTable:
    def __init__(self) -> None:
        self._ino_of: dict[Hashable, int] = {ident_of(""): ROOT_INODE}
        self._ref: dict[int, InodeRef] = {ROOT_INODE: ""}
        self._lookups: dict[int, int] = {}
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._ref)

    def ino(self, ref: InodeRef) -> int:
        """The inode number for `ref`, allocated on first use; not counted."""
        ident = ident_of(ref)
        ino = self._ino_of.get(ident)
        if ino is None:
            ino = self._next
            self._next += 1
            self._ino_of[ident] = ino
            self._ref[ino] = ref
        return ino

    def peek(self, ref: InodeRef) -> int | None:
        """The inode number `ref` already has, if the kernel knows it."""
        return self._ino_of.get(ident_of(ref))

    def lookup(self, ref: InodeRef) -> int:
        """Count one kernel reference (a lookup reply or a readdirplus entry)."""
        ino = self.ino(ref)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return ino

    def get(self, ino: int) -> InodeRef | None:
        return self._ref.get(ino)

    def forget(self, ino: int, nlookup: int) -> bool:
        """Drop `nlookup` references; the number is freed at zero (True).  Never
        raises: a forget for an unknown inode (already dropped) is ignored."""
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
        return True

    def known(self) -> list[tuple[int, InodeRef]]:
        return list(self._ref.items())
