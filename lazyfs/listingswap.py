"""A refresh's O(objects) work besides building its tree, run in worker
threads by catalog.py: telling whether a listing names the same versions as
the one served, diffing the trees, and freeing the listing and tree replaced.
Pure: no trio, no I/O."""

from __future__ import annotations

from lazyfs.namespace import Diff, RemoteObject, Tree, diff_trees


def same_versions(before: list[list[RemoteObject]], after: list[list[RemoteObject]]) -> bool:
    return all(b == a for b, a in zip(before, after, strict=True))  # RemoteObject compares every field


def diff_dropping_old(previous: list[Tree], old_lists: list[list[list[RemoteObject]]], new: Tree) -> Diff:
    """diff_trees in a worker thread, which also frees the old tree and listing:
    O(objects) too, and C code holding the GIL all along if done at once."""
    diff = diff_trees(previous.pop(), new)  # frees the folders; the listing still holds the objects
    drop_gradually(old_lists.pop())
    return diff


def drop_gradually(lists: list[list[RemoteObject]]) -> None:
    """Free a listing's objects a thousand at a time: the trio thread gets the GIL between."""
    for objects in lists:
        while objects:
            del objects[-1000:]
