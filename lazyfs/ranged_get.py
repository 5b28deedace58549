"""The bytes of one request, from the network into the sparse file.

Runs in a worker thread and blocks.  It writes only the request's own byte
range of the file and tells the trio thread about its progress through the
callbacks it is given (which post to the trio loop); it never touches
download state itself (docs/concurrency.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from lazyfs.backoff import retry_delay
from lazyfs.errors import RemoteUnavailable
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import Body, ObjectStore, ResponseMeta
from lazyfs.piecesums import PieceSums
from lazyfs.repeats import retry_line, shape
from lazyfs.stats import STATS
from lazyfs.storewrite import PieceWriter, WriteTurns
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

# First bytes of a request are posted early so a reader of a file's header
# waits for one round trip plus 64 KiB, not for a whole part.
FIRST_PIECE = 64 * 1024
# Later pieces: a GET in flight holds one piece, so this bounds memory per
# connection; 256 KiB keeps the per-piece overhead (a lock, a pwrite, a
# wake-up of the trio loop) far below the cost of the bytes.
PIECE = 256 * 1024


class Stopped(Exception):
    """The download was cancelled while this request ran."""


@dataclass(frozen=True, slots=True)
class RangeJob:
    """What a worker needs to fetch bytes [start, end) of `obj` into `fd`."""

    obj: RemoteObject
    fd: int
    write_turns: WriteTurns
    start: int
    end: int
    block_size: int
    attempts: int  # tries of a body that breaks off mid-way (botocore retries before the body)
    cancelled: Callable[[], bool]
    posted: Callable[[int], None]  # bytes [start, start + n) are on disk
    got_meta: Callable[[ResponseMeta], None]  # what the response headers say, for verification
    # Whether a piece may go to the store with O_DIRECT now (storewrite.py).
    direct: Callable[[], bool] = lambda: False
    sums: PieceSums | None = None  # the download's piece CRCs (piecesums.py)
    # An attempt begins at this byte (the CRT's fetch says so, the first and each retry after its backoff).
    attempting: Callable[[int], None] = lambda first_byte: None
    # The CRT's fetch cancelled an attempt as stalled: its last n bytes did not come within s seconds.
    stalled: Callable[[int, float], None] = lambda n, s: None

    def writer(self) -> PieceWriter:
        return PieceWriter(self.fd, self.obj, self.direct, self.write_turns, self.sums)


def fetch_range_blocking(remote: ObjectStore, job: RangeJob) -> None:
    """GET the job's bytes into the file, resuming within the range after a
    broken body.  Raises RemoteError when the retries are spent, Stopped when
    cancelled, OSError when the file cannot be written."""
    with job.writer() as writer:
        _fetch(remote, job, writer)


def _fetch(remote: ObjectStore, job: RangeJob, writer: PieceWriter) -> None:
    pos, end = job.start, job.end
    attempt = 0
    while True:
        if job.cancelled():
            raise Stopped()
        stream = remote.get_range(job.obj, pos, end)  # RemoteError: already retried
        job.got_meta(stream.meta)
        try:
            piece = FIRST_PIECE
            post_at = pos + piece  # the first bytes go to a waiting reader at once
            while pos < end:
                if job.cancelled():
                    raise Stopped()
                data = _read(stream, job.obj, min(piece, end - pos))
                piece = PIECE
                writer.write(data, pos)
                pos += len(data)
                if post_at <= pos < end:
                    # Then once per block: readers wait for whole blocks
                    # anyway, and each post wakes the trio thread.
                    job.posted(pos - job.start)
                    post_at = (pos // job.block_size + 1) * job.block_size
            return
        except RemoteUnavailable as e:
            # The body broke off: a failed request, after botocore saw it begin well (clientretries.py).
            STATS.bump("s3_errors", "GET")
            attempt += 1
            if attempt >= job.attempts:
                raise
            delay = retry_delay(attempt)
            retry_line(log, logging.INFO, (job.obj.uri, shape(str(e)), attempt), "%s; retrying bytes %d-%d in "
                       "%.1f s (attempt %d of %d)", naming(job.obj, e), pos, end - 1, delay, attempt + 1, job.attempts)
            STATS.bump("retries")
            time.sleep(delay)
        finally:
            stream.close()


def naming(obj: RemoteObject, e: Exception) -> str:
    """`e`'s message, starting with the object's URI once (most already do)."""
    message, uri = str(e), quoted(obj.uri)
    return message if message.startswith(uri) else f"{uri}: {message}"


def _read(stream: Body, obj: RemoteObject, n: int) -> bytes:
    """A piece of the body.  A socket error the client did not translate is
    still the network's fault, never the store's."""
    try:
        return stream.read(n)
    except RemoteUnavailable:
        raise
    except OSError as e:
        raise RemoteUnavailable(f"{quoted(obj.uri)}: transfer broke off ({type(e).__name__}: {e})",
                                bucket=obj.bucket, key=obj.key) from e
