"""A download's descriptor kept open while a worker thread or a bookkeeping
task uses it (download.Download.pin), and who releases a request's pin
(`Handoff`)."""

from __future__ import annotations

import threading
from typing import Protocol


class Pinned(Protocol):
    """What a pin holds open (a download.Download)."""

    pins: int

    def maybe_close_fd(self) -> None: ...


class Pin:
    """Keeps a download's descriptor open while a worker thread or a
    bookkeeping task uses it.  Released once (later calls do nothing)."""

    __slots__ = ("_dl",)

    def __init__(self, dl: Pinned) -> None:
        self._dl: Pinned | None = dl
        dl.pins += 1

    def release(self) -> None:
        dl, self._dl = self._dl, None
        if dl is not None:
            dl.pins -= 1
            dl.maybe_close_fd()

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Handoff:
    """Who releases a request's pin: the worker thread once it has started (it
    may outlive a task abandoned on cancel, and must keep the descriptor open
    until its last write), or the task when it was cancelled before that."""

    def __init__(self, pin: Pin) -> None:
        self.pin = pin
        self._lock = threading.Lock()
        self._owner = ""  # "" undecided, "thread", "task"

    def thread_starts(self) -> bool:
        with self._lock:
            if self._owner == "task":
                return False
            self._owner = "thread"
            return True

    def task_gives_up(self) -> None:
        with self._lock:
            if self._owner:
                return
            self._owner = "task"
        self.pin.release()
