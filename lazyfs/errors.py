"""The exception hierarchy and the one table from exception to errno.

Every module raises these types; only `fuse_ops` turns them into `FUSEError`
and only `cli` turns them into exit codes.  Messages are one sentence a user can
act on and never contain credentials.
"""

from __future__ import annotations

import errno
import logging
import signal

from lazyfs import redact


class LazyfsError(Exception):
    """Base class: something lazyfs itself understands and can explain."""

    errno: int = errno.EIO
    log_level: int = logging.ERROR  # of the one line a failed request logs (fuse_ops)


class ConfigError(LazyfsError):
    """Bad command line, model.json or environment (exit code 2)."""

    errno = errno.EINVAL


class BadEndpoint(ConfigError):
    """An endpoint that is not an http(s) URL, from any source (a flag, the
    environment, a profile): no command, doctor included, goes on with it."""


class UsageError(ConfigError):
    """A problem with how lazyfs was invoked (exit code 2)."""


class RemoteError(LazyfsError):
    """The object store failed or refused; `key` names the object when known."""

    errno = errno.EIO

    def __init__(self, message: str, *, bucket: str = "", key: str = "") -> None:
        super().__init__(redact.urls(message))  # (botocore's words quote a request's URL, the endpoint's password too)
        self.bucket = bucket
        self.key = key


class RemoteUnavailable(RemoteError):
    """Endpoint unreachable, timed out, or kept failing after retries."""

    errno = errno.EIO


class RemoteFailing(RemoteUnavailable):
    """The object store answered, with an error status (5xx, SlowDown), and
    kept doing so through the retries.  EIO, as for an unreachable one; but it
    is reachable, so a start that meets it is no offline start: the listing is
    retried (a burst of throttling must not keep a fleet's mounts from
    starting, nor hide what S3 can still serve)."""


class BadListing(RemoteFailing):
    """The object store answered a LIST with something that is no listing, or
    no listing that can be followed (listanswers.py): an HTML page with 200,
    a Size that is no number, "truncated" with no token, a token it gave
    before.  Answered, so reachable: a failed listing as a 5xx-ing one is."""


class OutOfDescriptors(RemoteUnavailable):
    """A request that could not open a connection for want of a descriptor
    (`EMFILE`: the daemon's limit; `ENFILE`: the system's), still so after
    the retries.  Not the network, and said so (exhausted.py); a reader gets
    that errno, as an open that needs a descriptor and gets none does.  Else
    as any transfer that failed: kept for a resume, tried again at the next
    open."""

    def __init__(self, message: str, err: int = errno.EMFILE, *, bucket: str = "", key: str = "") -> None:
        super().__init__(message, bucket=bucket, key=key)
        self.errno = err


class ShuttingDown(RemoteUnavailable):
    """A request that met the mount stopping (SIGTERM, an unmount): EIO, as
    for any fetch that cannot finish, but expected, not a fault: logged at
    INFO, not ERROR (fuse_ops)."""

    log_level = logging.INFO


class BucketNotFound(RemoteError):
    errno = errno.ENOENT


class ObjectNotFound(RemoteError):
    """The object is gone although it was listed (deleted since)."""

    errno = errno.ENOENT


# The object store's refusals that mean "these credentials may not read this":
# AccessDenied (EACCES), from either transfer client (remote.py, crt.py).
DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                          "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "403", "Forbidden"})


class AccessDenied(RemoteError):
    """Credentials missing, invalid, or not allowed to read this object: the
    bucket's policy or the credentials given, not lazyfs failing, so its line
    is a WARNING (the errno tells the reader)."""

    errno = errno.EACCES
    log_level = logging.WARNING


class CredentialsUnreachable(AccessDenied):
    """AWS credentials that could not be had for a reason that may pass: their
    source unreachable or not answering (a container or instance endpoint, STS
    for a role), answering with an error status, or a credential helper that
    fails or hangs.  Mid-run, EACCES as any refusal of credentials; at a
    mount's start, the object store is as good as unreachable, and the mount
    starts offline as for one that cannot be reached (offlinestart.py)."""


class ObjectChanged(RemoteError):
    """The object's ETag no longer matches the one the download pinned: a 412
    to If-Match, or an answer of another ETag or size (answers.py), which
    `detail` says in the download's line."""

    errno = errno.ESTALE

    def __init__(self, message: str, *, bucket: str = "", key: str = "", detail: str = "") -> None:
        super().__init__(message + detail, bucket=bucket, key=key)
        self.detail = detail


class WrongRange(RemoteError):
    """A GET answered with other bytes than it asked for: the object store (or
    a cache, a gateway in front of it) ignored the Range header, or answered
    another range (answers.py).  EIO, and not retried: it would answer the same."""


class PinnedVersionGone(RemoteError):
    """A version a lock pins that the object store no longer has (overwritten
    or deleted where no version id can bring it back, or its version deleted):
    a pinned mount serves nothing in its place.  ESTALE, not EIO: trying again
    will not help, and nothing is wrong with the object store itself."""

    errno = errno.ESTALE


class IntegrityError(LazyfsError):
    """Downloaded bytes do not match what the object store vouches for."""

    errno = errno.EIO


class StoreError(LazyfsError):
    """The local store could not be read or written (disk full, permissions)."""

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class NoThread(LazyfsError):
    """A thread could not be started: the process is at its limit of threads
    or processes (a cgroup's pids.max, ulimit -u), for now (threads.py).
    EAGAIN, as pthread_create says it: "Resource temporarily unavailable"
    (but EIO to a read: errno_of); a WARNING, as a limit the deployment
    set, not lazyfs failing."""

    errno = errno.EAGAIN
    log_level = logging.WARNING


def thread_limit(exc: BaseException) -> bool:
    """Is `exc` Python's failure to start a thread (pthread_create's EAGAIN)?"""
    return isinstance(exc, NoThread) or (isinstance(exc, RuntimeError) and "can't start new thread" in str(exc))


class Interrupted(SystemExit):
    """A command other than `mount` stopped by SIGINT or SIGTERM before it
    finished (interrupt.py).  It exits 128 + the signal's number, the
    shell's convention (130, 143); `unfinished` says what it did not do.  A
    SystemExit, not a KeyboardInterrupt (cli._stop says why): should it ever
    escape cli's handling, the process still exits with that code, silently."""

    def __init__(self, signum: int, unfinished: str = "") -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.unfinished = unfinished

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class UnsafeKey(ValueError):
    """An object key that cannot be mapped to a path safely (see namespace)."""


def again(exc: BaseException) -> BaseException:
    """A stored error (a failed download's), ready to raise once more for
    another reader.  Each raise appends its frames to the exception's
    traceback, so an error raised for every read of a failed file (a kernel
    retrying a fault in a loop) would keep the frames of all of them alive:
    each raise starts from an empty traceback instead."""
    return exc.with_traceback(None)


def errno_of(exc: BaseException, reading: bool = False) -> int:
    """The errno a reader should see for `exc` (`reading`: answering a read): the one table, in one place."""
    if isinstance(exc, LazyfsError):
        # A store's file or folder missing is never the reader's file missing (which a loader
        # takes for an optional file absent): EIO, as for any store failure.
        err = errno.EIO if isinstance(exc, StoreError) and exc.errno == errno.ENOENT else exc.errno
    elif isinstance(exc, OSError) and exc.errno:
        err = exc.errno  # local I/O failures keep their meaning (ENOSPC stays ENOSPC)...
    else:
        return errno.EIO
    # ...but not a store that turned read-only under the mount: a reader who
    # asked for nothing but to read would be told EROFS, as if it had written.
    # Nor EAGAIN to a read (NoThread): Python's `f.read()` takes it for a
    # non-blocking file with no data yet and returns the bytes it has so far,
    # or None: a file silently cut short.  EIO is a failure every reader sees.
    return errno.EIO if err == errno.EROFS or (reading and err == errno.EAGAIN) else err
