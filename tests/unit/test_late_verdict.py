"""An open that gives up on the store (probe.LateVerdict): whatever the probe
made after that, or just as it, is released, never leaked; what the open
took stays with it."""

from __future__ import annotations

import os
from typing import Any

from lazyfs.filestate import FileState
from lazyfs.namespace import RemoteObject
from lazyfs.probe import LateVerdict, Local, release
from lazyfs.store import LocalCopy

OBJ = RemoteObject("bkt", "m/a.bin", 1, "e", 0)
STORE: Any = None  # a Local verdict needs nothing of the store to be released


def local() -> Local:
    return Local(LocalCopy(os.open(os.devnull, os.O_RDONLY), None, FileState.CACHED))  # type: ignore[arg-type]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_a_verdict_made_after_the_open_gave_up_is_released_by_its_thread() -> None:
    late = LateVerdict(STORE, OBJ)
    assert late.abandon() is None
    verdict = local()
    late.run(lambda: verdict)
    assert not is_open(verdict.copy.fd)


def test_a_verdict_made_just_as_the_open_gave_up_is_handed_back_to_release() -> None:
    late = LateVerdict(STORE, OBJ)
    verdict = local()
    late.run(lambda: verdict)  # made; the open was cancelled before it took it
    made = late.abandon()
    assert made is verdict and is_open(verdict.copy.fd)
    release(STORE, OBJ, made)
    assert not is_open(verdict.copy.fd)


def test_a_verdict_the_open_took_is_left_alone() -> None:
    late = LateVerdict(STORE, OBJ)
    verdict = local()
    assert late.run(lambda: verdict) is verdict
    late.taken()
    assert late.abandon() is None and is_open(verdict.copy.fd)
    os.close(verdict.copy.fd)
