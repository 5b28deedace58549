"""The kernel notifications without a kernel: one the kernel holds up (a read
in flight owns a page, a lookup its folder) never blocks whoever starts it,
and holds up the stop until it ends."""

from __future__ import annotations

import threading

import pyfuse3
import pytest
import trio

from lazyfs.inodes import InodeTable
from lazyfs.kernelcache import KernelCache
from lazyfs.namespace import Diff, RemoteObject
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
    inodes = InodeTable()
    kernel = KernelCache(inodes)
    folder = inodes.ino("m")
    with trio.fail_after(10):
        assert kernel.forget_names(Diff(added=(OBJ,))) == 2  # "m" in the root, "w.bin" in "m"
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
