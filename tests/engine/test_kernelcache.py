"""The kernel notifications without a kernel: one the kernel holds up (a read
in flight owns a page, a lookup its folder) never blocks whoever starts it,
and holds up the stop until it ends."""

from __future__ import annotations

import dataclasses
import threading

import pyfuse3
import pytest
import trio

from lazyfs.inodes import InodeTable
from lazyfs.kernelcache import KernelCache
from lazyfs.namespace import RemoteObject, build_tree, diff_trees
from support.enginekit import trio_test

OBJ = RemoteObject("b", "m/w.bin", 10, '"e"', 0)


def held_up_invalidation(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[int]]:
    """pyfuse3.invalidate_inode as the kernel runs it while a read holds a
    page: it returns once `answered` is set."""
    answered = threading.Event()
    calls: list[int] = []

    def invalidate_inode(ino: int, attr_only: bool = False) -> None:
        calls.append(ino)
        answered.wait(30)

    monkeypatch.setattr(pyfuse3, "invalidate_inode", invalidate_inode)
    return answered, calls


@trio_test
async def test_stopping_waits_for_a_notification_under_way_then_starts_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    answered, calls = held_up_invalidation(monkeypatch)
    inodes = InodeTable()
    kernel = KernelCache(inodes)
    ino = inodes.ino(OBJ)
    with trio.fail_after(10):
        kernel.drop_pages(OBJ)  # returns at once, held up or not
        await trio.sleep(0.1)
        assert calls == [ino]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.settle)
            await trio.sleep(0.3)
            assert nursery.child_tasks, "stopped answering reads while a page drop waited for one"
            answered.set()  # the main loop answered the read
        kernel.drop_pages(OBJ)  # stopping: no new notification starts
        await trio.sleep(0.1)
    assert calls == [ino]


@trio_test
async def test_names_are_forgotten_on_a_thread_the_stop_waits_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name waits for the lookups of its folder in flight, like a page for its reads."""
    answered = threading.Event()
    forgotten: list[tuple[int, bytes]] = []

    def invalidate_entry(ino: int, name: bytes, deleted: int = 0) -> None:
        answered.wait(30)
        forgotten.append((ino, name))

    monkeypatch.setattr(pyfuse3, "invalidate_entry", invalidate_entry)
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only=False: None)
    inodes = InodeTable()
    kernel = KernelCache(inodes)
    folder = inodes.ino("m")
    with trio.fail_after(10):
        # "m" is a new folder: its name in the root, and "w.bin" in "m"
        assert kernel.forget_names(diff_trees(build_tree([]), build_tree([OBJ]))) == 2
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.settle)
            await trio.sleep(0.2)
            assert nursery.child_tasks and not forgotten
            answered.set()
    assert forgotten == [(1, b"m"), (folder, b"w.bin")]


@trio_test
async def test_pages_of_a_version_the_kernel_never_saw_are_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    answered, calls = held_up_invalidation(monkeypatch)
    answered.set()
    kernel = KernelCache(InodeTable())
    kernel.drop_pages(OBJ)
    await kernel.settle()
    assert calls == []



def recorded_notifications(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[int, bytes]], list[tuple[int, bool]]]:
    entries: list[tuple[int, bytes]] = []
    attrs: list[tuple[int, bool]] = []
    monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda ino, name, deleted=0: entries.append((ino, name)))
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only=False: attrs.append((ino, attr_only)))
    return entries, attrs


@trio_test
async def test_a_file_added_beside_others_forgets_its_own_name_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel drops everything cached below a name it forgets: forgetting
    the folder's name would renumber every closed file in it and drop their
    pages.  The folder's attributes (date, links) are refreshed instead."""
    entries, attrs = recorded_notifications(monkeypatch)
    inodes = InodeTable()
    kernel = KernelCache(inodes)
    inodes.ino("m")
    folder = inodes.ino("m/d")
    kept = RemoteObject("b", "m/d/a.bin", 1, '"a"', 0)
    added = RemoteObject("b", "m/d/new.bin", 1, '"n"', 0)
    with trio.fail_after(10):
        assert kernel.forget_names(diff_trees(build_tree([kept]), build_tree([kept, added]))) == 1
        await kernel.settle()
    assert entries == [(folder, b"new.bin")]
    assert attrs == [(folder, True)]


@trio_test
async def test_a_folder_that_vanished_is_forgotten_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    entries, attrs = recorded_notifications(monkeypatch)
    inodes = InodeTable()
    kernel = KernelCache(inodes)
    top, folder = inodes.ino("m"), inodes.ino("m/d")
    kept = RemoteObject("b", "m/d/a.bin", 1, '"a"', 0)
    gone = RemoteObject("b", "m/x/gone.bin", 1, '"g"', 0)
    diff = diff_trees(build_tree([kept, gone]), build_tree([kept]))
    assert diff.folders == ("m/x",)
    with trio.fail_after(10):
        assert kernel.forget_names(diff) == 1  # "x" in "m"; the kernel never looked into "m/x"
        await kernel.settle()
    assert entries == [(top, b"x")] and attrs == [(top, True)] and folder not in {i for i, _ in attrs}


@trio_test
async def test_a_file_added_deep_down_refreshes_the_attributes_of_every_folder_it_redates(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: only the folder holding the new file was refreshed, and `stat`
    of its grandparent showed the old date for up to five minutes."""
    entries, attrs = recorded_notifications(monkeypatch)
    inodes = InodeTable()
    kernel = KernelCache(inodes)
    a, b, c = inodes.ino("a"), inodes.ino("a/b"), inodes.ino("a/b/c")
    old = [RemoteObject("b", "a/b/c/f", 1, '"f"', 10)]
    added = RemoteObject("b", "a/b/c/deep/new.py", 1, '"n"', 20)
    with trio.fail_after(10):
        assert kernel.forget_names(diff_trees(build_tree(old), build_tree([*old, added]))) == 1  # "deep" in c
        await kernel.settle()
    assert entries == [(c, b"deep")]
    assert sorted(ino for ino, _ in attrs) == sorted([1, a, b, c]) and all(only for _, only in attrs)


@trio_test
async def test_a_file_uploaded_again_with_the_same_bytes_gets_its_new_date(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same ETag and size, a new Last-Modified: the same version, so the same
    inode and its pages stay; but before, the kernel kept the file's cached
    attributes and the inode still stood for the old listing entry, so `stat`
    showed the old date (older than its folder's) until a listing of the folder."""
    entries, attrs = recorded_notifications(monkeypatch)
    inodes = InodeTable()
    kernel = KernelCache(inodes)
    folder = inodes.ino("m")
    old = RemoteObject("b", "m/data.txt", 1, '"d"', 10)
    again = RemoteObject("b", "m/data.txt", 1, '"d"', 20)
    ino = inodes.lookup(old)
    unseen = RemoteObject("b", "m/other.txt", 1, '"o"', 10)  # the kernel never looked it up: nothing to tell
    with trio.fail_after(10):
        diff = diff_trees(build_tree([old, unseen]), build_tree([again, dataclasses.replace(unseen, mtime_ns=30)]))
        assert kernel.forget_names(diff) == 0  # no name changed meaning
        await kernel.settle()
    assert entries == []
    assert sorted(attrs) == sorted([(1, True), (folder, True), (ino, True)])  # attributes only: pages stay
    assert inodes.get(ino) == again and inodes.peek(again) == ino
