"""Helpers for the engine tier (tests/engine): a trio loop per test under a
deadline, the engine's tasks for a block, polling with a timeout."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from lazyfs.config import FetchConfig
from lazyfs.fetch import Fetcher

TEST_DEADLINE_S = 30.0
BUCKET = "bkt"


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh trio loop (fixtures are passed through)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            with trio.fail_after(TEST_DEADLINE_S):
                await fn(*args, **kwargs)

        trio.run(main)

    wrapper.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    return wrapper


def fetch_config(**kw: Any) -> FetchConfig:
    kw.setdefault("part_size", 256 * 1024)
    kw.setdefault("read_deadline", 10.0)
    return FetchConfig(**kw)


@contextlib.asynccontextmanager
async def running(fetcher: Fetcher, close: bool = True) -> AsyncIterator[Fetcher]:
    """The engine's tasks for the block; on exit, a clean close (or, with
    `close=False`, everything cancelled at once, as a crash leaves it)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        try:
            yield fetcher
        finally:
            if close:
                with trio.move_on_after(5):
                    await fetcher.close()
            nursery.cancel_scope.cancel()


async def wait_for(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    with trio.move_on_after(timeout):
        while True:
            value = cond()
            if value:
                return value
            await trio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def drop_locks(fetcher: Fetcher) -> None:
    """What the kernel does for a process that died: its descriptors close,
    so its download locks are free for the next process on the store."""
    import os

    for dl in fetcher.downloads():
        if dl.lock_fd >= 0:
            os.close(dl.lock_fd)
            dl.lock_fd = -1
