"""`lazyfs status --lock FILE --verify content`: hash the copies on disk
against the checksums the lock names, for whoever will not take an identity
record's word for it.  A progress bar (tqdm, on standard error when it is a
terminal) shows the bytes hashed.  Blocking; reads every byte once.

Each copy's result: "match" (its bytes are the locked version's), "differs"
(they are not), or "no checksum" (the lock names nothing to hash against,
or a multipart ETag whose part sizes the store never confirmed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from lazyfs import verify
from lazyfs.errors import IntegrityError
from lazyfs.lockfile import Entry
from lazyfs.store import Store

_CHUNK = 4 * 1024 * 1024


def against_lock(store: Store, entries: Sequence[Entry], on_disk: set[str]) -> dict[str, str]:
    """key -> result, for the entries whose key has a current copy in the store."""

    def opened(e: Entry) -> int | None:
        copy = store.find_current(e.obj())
        return copy.fd if copy is not None else None

    return _check_all(entries, on_disk, opened)


def through_mount(root: Path, entries: Sequence[Entry], on_disk: set[str]) -> dict[str, str]:
    """The same, reading through a running mount (only files it serves from
    disk are asked for, so nothing is downloaded)."""

    def opened(e: Entry) -> int | None:
        try:
            return os.open(root / e.key, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    return _check_all(entries, on_disk, opened)


def _check_all(entries: Sequence[Entry], on_disk: set[str], open_copy: Callable[[Entry], int | None]) -> dict[str, str]:
    from tqdm import tqdm

    todo = [e for e in entries if e.key in on_disk]
    out: dict[str, str] = {}
    with tqdm(total=sum(e.size for e in todo), unit="B", unit_scale=True, unit_divisor=1024, desc="checking",
              file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
        for e in todo:
            fd = open_copy(e) if e.check is not None else None
            if fd is None:
                bar.update(e.size)
                out[e.key] = "no checksum" if e.check is None else "differs"
                continue
            try:
                out[e.key] = _hashed(fd, e, bar)
            finally:
                os.close(fd)
    return out


def _hashed(fd: int, e: Entry, bar: Any) -> str:
    assert e.check is not None
    try:
        digest = verify.Digest(e.check)
    except ValueError:  # an algorithm this machine cannot compute
        bar.update(e.size)
        return "no checksum"
    pos = 0
    try:
        while pos < e.size:
            end = min(pos + _CHUNK, e.size)
            verify.feed(fd, pos, end, digest)
            bar.update(end - pos)
            pos = end
    except IntegrityError:  # shorter than the locked size
        bar.update(e.size - pos)
        return "differs"
    if digest.value() == e.check.value:
        return "match"
    return "differs" if e.check.exact else "no checksum"
