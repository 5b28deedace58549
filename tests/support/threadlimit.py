"""Thread starts refused on cue, as under a cgroup's `pids.max`.

Every `trio.to_thread.run_sync` and `trio.lowlevel.start_thread_soon` starts
(or reuses) its thread through trio's one thread cache; while `on`, that
raises what Python raises when pthread_create fails (EAGAIN).  Stricter than
a real limit, which lets idle threads be reused: no work starts at all.
tests/e2e/test_pids_limit.py puts a real mount in a pids cgroup instead.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from trio._core import _thread_cache


class ThreadLimit:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        self.refused = 0  # starts refused while on
        self._lock = threading.Lock()
        real = _thread_cache.ThreadCache.start_thread_soon

        def start_thread_soon(cache: Any, fn: Any, deliver: Any, name: str | None = None) -> None:
            if self.on:
                with self._lock:
                    self.refused += 1
                raise RuntimeError("can't start new thread")
            real(cache, fn, deliver, name)

        monkeypatch.setattr(_thread_cache.ThreadCache, "start_thread_soon", start_thread_soon)
