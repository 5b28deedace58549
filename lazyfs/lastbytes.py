"""A file's last bytes wait for its verification.

A reader of a file still arriving is served its bytes as they land, before
the whole file can be checked against what the object store vouches for.
Bytes that then fail the check were already served; what makes that safe is
two rules, so that no reader of a whole file ever gets to its end without
an error unless every byte it read was verified:

- The blocks whose landing completes a file are *held*: no reader gets them
  until the file is verified (and published).  A reader of the whole file
  reads them too, so it either ends on verified bytes or fails there.  The
  wait is the verification's, at most `verify_deadline` (verification runs
  alongside the download, so it is usually over with the last byte).
- A download that starts over (its bytes failed the check) has a new
  *generation*; an open file that was served bytes of an earlier one fails
  its further reads with EIO (handles.py), rather than going on as if the
  bytes it already has were right.  The kernel's cached pages of the file are
  dropped meanwhile (runner.py, coop.py), so the next open reads good ones.

A follower of another process's download (coop.py) does not know which
blocks completed the file: it holds them all once the owner's record names
every block, until the file is published.  What tells it the file it mapped
passed the check is the file itself, sealed (`sealed`): published, then
evicted by the owner's budget, or followed by a fresh download, it is still
verified, not a file started over.  Trio-side state, like the downloads it
belongs to (docs/concurrency.md), but for `sealed` (a worker thread's look).
"""

from __future__ import annotations

import os
import stat

from lazyfs.errors import IntegrityError
from lazyfs.namespace import RemoteObject
from lazyfs.wording import quoted

# Verification follows the download, and catches up after its last byte at
# no less than this rate (MD5 runs at 500+ MB/s on one core).
VERIFY_CATCH_UP = 100 << 20


def verify_deadline(obj: RemoteObject, read_deadline: float) -> float:
    """How long a reader waits for held bytes: its read deadline, plus the
    time a check from the disk would take, should it not have kept up."""
    return read_deadline + obj.size / VERIFY_CATCH_UP


class ServedBadBytes(IntegrityError):
    """An open file was served bytes of a download that then failed verification."""


# A handle's served generation once it was refused: its later reads fail without a log line of their own.
REFUSED = -1


def refuse_stale_generation(obj: RemoteObject, served: int, served_generation: int, generation: int) -> None:
    """ServedBadBytes when a handle that was served bytes of generation
    `served_generation` (REFUSED: refused before) reads on after the download
    started over."""
    if served and served_generation != generation:
        e = ServedBadBytes(f"{quoted(obj.uri)}: bytes this open file read earlier failed verification "
                           "(the download started over); open the file again")
        e.logged = served_generation == REFUSED  # type: ignore[attr-defined]  # one line per open file
        raise e


def sealed(fd: int, obj: RemoteObject) -> bool:
    """Worker thread: did the owner seal its download file `fd` (store.Store._seal,
    once its bytes passed verification, before the rename into place): made
    read-only and dated with the object's Last-Modified (or that cut to the
    second, as identity.Identity.describes allows)?  A sparse file being
    written is 0600 and dated by its writes.  The inode says it, so it still
    does once an eviction unlinked the name."""
    st = os.fstat(fd)
    m = obj.mtime_ns
    return not st.st_mode & stat.S_IWUSR and st.st_size == obj.size and st.st_mtime_ns in (m, m - m % 10**9)
