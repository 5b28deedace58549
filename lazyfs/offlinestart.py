"""A mount's start without the object store: which failures of the start-up
listing make it start offline, and what it then serves (offline.py), or why
it cannot start.

Offline is for a start that could not ask: the object store unreachable or
not answering, or AWS credentials that cannot be had for now (their source
unreachable, failing or hanging: errors.CredentialsUnreachable), which is
the same for a pod whose store could serve everything.  An answer with
errors (RemoteFailing) is no offline start: the object store is reachable,
and the listing is retried.  A refusal (a wrong bucket, credentials refused
or misconfigured) ends the start (exit 1).

A listing that could not open a connection for want of a descriptor is no
unreachable object store either.  EMFILE, the daemon's own limit, ends the
start (exit 1, naming the limit): the daemon holds only its own few
descriptors then, and no reader can hold any (nothing is mounted yet), so
none will be freed; the listing's socket is one of the first it opens, so
the store's files could not be opened either (a store full of files was
called one with "nothing to serve").  ENFILE, the system's table full, is
other processes' doing and may pass: an offline start, until descriptors can
be had again.

Blocking (store_knows walks the store): run before the mount.
"""

from __future__ import annotations

import errno
import logging

from lazyfs import wording
from lazyfs.config import MountConfig
from lazyfs.errors import (
    CredentialsUnreachable,
    LazyfsError,
    OutOfDescriptors,
    RemoteError,
    RemoteFailing,
    RemoteUnavailable,
)
from lazyfs.exhausted import descriptors
from lazyfs.mounttab import MountError
from lazyfs.namespace import RemoteObject
from lazyfs.offline import store_knows
from lazyfs.store import Store

log = logging.getLogger(__name__)


def starts_offline(error: RemoteError) -> bool:
    """Whether a start-up listing that failed with `error` makes the mount start offline."""
    if isinstance(error, RemoteFailing):  # answered (5xx, SlowDown): reachable
        return False
    if isinstance(error, OutOfDescriptors) and error.errno == errno.EMFILE:  # the daemon's own limit: stays
        return False
    return isinstance(error, (RemoteUnavailable, CredentialsUnreachable))


def start_failure(error: RemoteError) -> LazyfsError:
    """The start's one line (exit 1) for a listing that failed and starts no offline mount."""
    if isinstance(error, OutOfDescriptors):  # (cli adds what to do about it)
        where = wording.quoted(f"s3://{error.bucket}/{error.key}")
        return OutOfDescriptors(f"cannot list {where}: {descriptors(error.errno)}", error.errno,
                                bucket=error.bucket, key=error.key)
    return MountError(str(error))


def until(error: RemoteError) -> str:
    """What an offline start waits for, in its line."""
    if isinstance(error, CredentialsUnreachable):
        return "AWS credentials can be had (asked for again at each try of the listing) and the object store answers"
    if isinstance(error, OutOfDescriptors):
        return "the system has descriptors to spare again (the listing is tried every 10 s)"
    return "the object store is reachable again"


def offline_start(store: Store, cfg: MountConfig, error: RemoteError) -> list[RemoteObject]:
    """The object store cannot be asked: serve what is on disk, or fail (a saved listing alone serves only EIO)."""
    known = store_knows(store, cfg.sources)
    files, on_disk = wording.count(len(known.objects), "file"), known.on_disk(store, cfg.fetch.verify_prebaked)
    if not on_disk:
        listed = f" (it knows {files}, none of them on disk)" if known.objects else ""
        raise MountError(f"{error}, and the store {cfg.store_path} has nothing to serve for "
                         f"{', '.join(s.uri for s in cfg.sources)}{listed}") from None
    gone = (f"; {wording.count(known.left_out, 'file')} on disk that the saved listing no longer names (deleted "
            "from the object store) not served") if known.left_out else ""
    log.warning("%s: starting offline with the %s the store knows, %s; the others fail with EIO until %s%s",
                error, files, on_disk.said(), until(error), gone)
    return known.objects
