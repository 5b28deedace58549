"""The cache budget's engine-tier kit: a Fetcher, its Handles and a Budget
wired as mount.py wires them, with a watch on the budget's level and on what
the store really holds (tests/engine/test_budget*.py)."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import trio
import trio.testing

from lazyfs.budget import Budget
from lazyfs.download import Download, Request
from lazyfs.fetch import Fetcher
from lazyfs.handles import Handles
from lazyfs.namespace import RESERVED_NAME, RemoteObject
from lazyfs.store import Store
from support.enginekit import BUCKET, fetch_config, running, wait_for
from support.fakeremote import FakeRemote

KiB = 1024
UNIT = 256 * KiB  # one block and one part (fetch_config's part size): one GET per file
DEADLINE_S = 10.0  # each test takes well under a second; a lost wake-up fails it here


def quick(fn: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """A tighter deadline than the engine tier's."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(DEADLINE_S):
            await fn(*args, **kwargs)

    return wrapper


class Engine:
    """A Fetcher, its Handles and a Budget wired as mount.py wires them, and a
    watch on the budget: at every GET the dispatcher starts, the budget's level
    (used + reserved) and the bytes lazyfs holds in the store (published
    fetched files plus the downloads in flight) are recorded."""

    def __init__(self, remote: FakeRemote, store: Store, root: Path, max_bytes: int, **cfg: Any) -> None:
        self.store = store
        self.fetcher = Fetcher(remote, store, fetch_config(**cfg))
        self.handles = Handles(self.fetcher)
        self.budget = Budget(store, max_bytes)
        self.fetcher.hooks.budget = self.budget
        self.root = root
        self.levels: list[int] = []
        self.on_disk: list[int] = []
        start_request = self.fetcher.runner.start_request

        def watched(dl: Download, req: Request) -> None:
            self.levels.append(self.budget.used + self.budget.reserved)
            self.on_disk.append(self.disk_bytes())
            start_request(dl, req)

        self.fetcher.runner.start_request = watched  # type: ignore[method-assign]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The engine's tasks and the budget's own (Budget.run, as the mount starts it)."""
        async with running(self.fetcher), trio.open_nursery() as nursery:
            nursery.start_soon(self.budget.run)
            yield
            nursery.cancel_scope.cancel()

    def fetched_bytes(self) -> int:
        """Bytes of the fetched files (those the budget counts) at their paths in the store now."""
        return sum(size for _key, size, _atime in self.store.fetched_files())

    def files(self) -> dict[str, int]:
        """Key -> size of the files published in the store (prebaked copies
        included), as they are on disk right now."""
        out = {}
        for dirpath, _dirs, names in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            if rel.split("/", 1)[0] == RESERVED_NAME:
                continue
            for name in names:
                try:
                    size = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue  # evicted (in a worker thread) as we looked
                out[name if rel == "." else f"{rel}/{name}"] = size
        return out

    def kept(self) -> set[str]:
        return set(self.files())

    def disk_bytes(self) -> int:
        """Bytes of the files in the store (whatever the budget thinks) and of
        the downloads in flight that will be kept."""
        files = self.files()
        # (a download just renamed into place is registered until its task resumes: once)
        return sum(files.values()) + sum(dl.obj.size for dl in self.fetcher.downloads()
                                         if dl.keep and dl.obj.key not in files)

    async def settled(self) -> None:
        """Every download over and the budget told of it (published is a task)."""
        await wait_for(lambda: not self.fetcher.downloads() and self.budget.reserved == 0,
                       "the downloads to end and the budget to be told", timeout=3)
        await trio.testing.wait_all_tasks_blocked()  # (a task waiting for a thread counts as blocked)
        await wait_for(lambda: not self.budget._lock.locked(), "the evictions to end", timeout=3)

    async def read_whole(self, obj: RemoteObject, data: bytes) -> int:
        """Open `obj`, read it all, check its bytes; the handle stays open."""
        fh = await self.handles.open(obj)
        assert bytes(await self.handles.read(fh, 0, obj.size)) == data
        return fh

    async def cached(self, obj: RemoteObject, data: bytes) -> None:
        """Fetch `obj` through a reader who then closes it: a closed fetched file."""
        fh = await self.read_whole(obj, data)
        self.handles.release(fh)
        await self.settled()
        assert obj.key in self.kept()


def put(remote: FakeRemote, key: str, size: int) -> tuple[RemoteObject, bytes]:
    data = os.urandom(size)  # every file different: none is linked from another's bytes
    return remote.put(BUCKET, key, data), data
