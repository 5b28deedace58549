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
from lazyfs.store import LocalCopy, Store

_CHUNK = 4 * 1024 * 1024


def against_lock(store: Store, entries: Sequence[Entry], on_disk: set[str]) -> dict[str, str]:
    """key -> result, for the entries whose key has a current copy in the store.
    A copy without an identity record that does not match is passed over for
    the next layer's, as a pinned mount passes it over (probe.PrebakedCheck):
    the result is the copy such a mount would serve, else the first one's."""

    def check(e: Entry, bar: Any) -> str:
        results: list[str] = []

        def accept(obj: object, copy: LocalCopy) -> bool:
            if results:  # the bar counted one copy of this file already
                bar.total += e.size
                bar.refresh()
            results.append(_hashed(copy.fd, e, bar))
            return results[-1] == "match"

        copy = store.find_current(e.obj(), accept)
        if copy is None:
            return results[0] if results else "differs"
        try:
            return "match" if results and results[-1] == "match" else _hashed(copy.fd, e, bar)
        finally:
            os.close(copy.fd)

    return _check_all(entries, on_disk, check)


def through_mount(root: Path, entries: Sequence[Entry], on_disk: set[str]) -> dict[str, str]:
    """The same, reading through a running mount (only files it serves from
    disk are asked for, so nothing is downloaded)."""

    def check(e: Entry, bar: Any) -> str:
        try:
            fd = os.open(root / e.key, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            bar.update(e.size)
            return "differs"
        try:
            return _hashed(fd, e, bar)
        finally:
            os.close(fd)

    return _check_all(entries, on_disk, check)


def _check_all(entries: Sequence[Entry], on_disk: set[str], check: Callable[[Entry, Any], str]) -> dict[str, str]:
    from tqdm import tqdm

    todo = [e for e in entries if e.key in on_disk]
    out: dict[str, str] = {}
    with tqdm(total=sum(e.size for e in todo), unit="B", unit_scale=True, unit_divisor=1024, desc="checking",
              file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
        for e in todo:
            if e.check is None:
                bar.update(e.size)
                out[e.key] = "no checksum"
            else:
                out[e.key] = check(e, bar)
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
