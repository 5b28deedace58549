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
every block, until the file is published.  Trio-side state, like the
downloads it belongs to (docs/concurrency.md).
"""

from __future__ import annotations

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
