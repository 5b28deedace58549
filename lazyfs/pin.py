"""A download's descriptor kept open while a worker thread or a bookkeeping
task uses it (download.Download.pin)."""

from __future__ import annotations

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
