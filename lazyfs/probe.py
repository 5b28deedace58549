"""What an open finds in the store, in one worker-thread hop: a current local
copy, the same bytes linked from another path, the right to download it,
another process downloading it, or nothing we may fetch now.

Blocking: call `probe_store` from a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import cachetools

from lazyfs import verify
from lazyfs.completion import UNVERIFIED, check, expectation, listed_expectation
from lazyfs.errors import IntegrityError, RemoteError, RemoteUnavailable, StoreError
from lazyfs.exhausted import DESCRIPTOR_ERRNOS, no_room
from lazyfs.filestate import REJECTED, SIZE, LocalCopy, PrebakedAccept
from lazyfs.identity import Identity
from lazyfs.layer import Layer
from lazyfs.namespace import RemoteObject, Version
from lazyfs.objectstore import ObjectStore
from lazyfs.partials import Partial
from lazyfs.store import Store
from lazyfs.wording import quoted

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Local:
    copy: LocalCopy  # (copy.linked: made just now from identical bytes under another path)


@dataclass(slots=True)
class Fetch:
    """This process may download the version: it holds the store lock, and
    the sparse file when it was opened right away."""

    lock_fd: int
    partial: Partial | None


@dataclass(slots=True)
class Foreign:
    """Another process on this store downloads it."""


@dataclass(slots=True)
class Unavailable:
    """Not on disk, and we may not fetch now (offline, or shutting down)."""


Verdict = Local | Fetch | Foreign | Unavailable


class _Judged(NamedTuple):
    verified: str  # how its content was checked (an algorithm), SIZE, or "" (not served)
    # Judged without the object store (it could not be reached): how many
    # listings had succeeded then.  It holds until another succeeds (the
    # object store answers again), then the next open checks the copy again.
    # None: for good.
    listings: int | None = None


class PrebakedCheck:
    """--verify etag, and every pinned mount or bake: an unrecorded local copy
    is current only if its content matches the object's checksum or ETag.
    Each copy is hashed once per process, and the result recorded where the
    store is writable (with how it was checked); for a copy in a read-only
    layer, the memo is what says how it was checked (`checked`:
    user.lazyfs.verified).

    `pinned`: `remote` answers from the lock (pinned.PinnedStore), and a copy
    whose content cannot be checked (the lock names no checksum) is not
    served: only its size would vouch for it, and a pinned mount serves
    nothing but the locked bytes.  Unpinned, such a copy is used, as the
    seed's rule says, but for one a multipart ETag at the part sizes assumed
    does not match where the store cannot say its part sizes: bad bytes or
    uncommon part sizes, which a download can tell apart (completion.check)
    and a copy cannot, so the object is downloaded instead.

    When the object store cannot be reached (an offline start), the copy is
    checked against what the listing says (completion.listed_expectation):
    a match is final; a mismatch is not served, and a copy nothing could be
    checked against is served by its size (the seed's rule: an offline start
    is what prebaked copies are for), each only until the next listing
    succeeds (`listings`: how many have, read from store threads), when the
    next open checks it with the object store.  A copy refused then after it
    was served is `withdrawn`: the kernel's pages of it must go."""

    def __init__(self, remote: ObjectStore, store: Store, pinned: bool = False, *, etag_is_md5: bool = True,
                 listings: Callable[[], int] = lambda: 0) -> None:
        self.remote = remote
        self.store = store
        self.pinned = pinned
        self.etag_is_md5 = etag_is_md5  # (not with --no-etag-check)
        self.listings = listings
        # Whether the mount is offline (set by the mount: its catalog's): no HEAD is then sent, whose
        # retries would hold each copy's first open up (~25 s where the endpoint does not answer).
        self.offline: Callable[[], bool] = lambda: False
        # Keyed by the copy's inode and mtime: a replaced copy is checked again.
        # Store threads call this concurrently; the LRU is not thread-safe.
        self._results: cachetools.LRUCache[tuple[object, ...], _Judged] = cachetools.LRUCache(maxsize=65536)
        self._withdrawn: set[Version] = set()
        self._lock = threading.Lock()

    def __call__(self, obj: RemoteObject, copy: LocalCopy) -> bool:
        st = os.fstat(copy.fd)
        memo_key = _memo_key(obj, copy.layer.label, st)
        with self._lock:
            judged = self._results.get(memo_key)
        listings = self.listings()  # (before the check: a listing that succeeds meanwhile comes after it)
        if judged is None or judged.listings not in (None, listings):
            served_before = judged is not None and judged.verified != ""
            judged = self._check(obj, copy, listings)  # hashing: outside the lock
            with self._lock:
                self._results[memo_key] = judged
                if served_before and not judged.verified:
                    self._withdrawn.add(obj.version)
        return judged.verified != ""

    def checked(self, obj: RemoteObject, layer: Layer, st: os.stat_result) -> str:
        """How this unrecorded copy's content was checked, if it was and
        matched; REJECTED if it was and is not served; "" if not checked yet."""
        with self._lock:
            judged = self._results.get(_memo_key(obj, layer.label, st))
        return "" if judged is None else judged.verified or REJECTED

    def withdrawn(self, obj: RemoteObject) -> bool:
        """Was a copy of `obj` served (judged without the object store), and
        refused since?  Said once, to an open (trio thread), which then does
        not keep the pages the kernel cached from that copy."""
        with self._lock:
            if obj.version not in self._withdrawn:
                return False
            self._withdrawn.discard(obj.version)
            return True

    def _check(self, obj: RemoteObject, copy: LocalCopy, listings: int) -> _Judged:
        exp = None
        whose = "the locked version's" if self.pinned else "the object's"
        if self.offline() and not self.pinned:  # (a lock answers without the object store)
            return self._without_store(obj, copy, RemoteUnavailable("the mount is offline"), listings)
        try:
            exp = expectation(self.remote, obj)
            verified = check(self.remote, copy.fd, obj, exp, lambda: False)
        except IntegrityError:
            log.warning("%s: the local copy in the %s does not match %s %s; not serving it",
                        quoted(obj.uri), copy.layer.label, whose, exp.algorithm if exp else "checksum")
            return _Judged("")
        except RemoteError as e:
            return self._without_store(obj, copy, e, listings)
        if verified == UNVERIFIED and exp is not None and self.pinned:
            return _Judged(self._by_size(obj, copy, "its part sizes are not known"))
        if verified == UNVERIFIED and exp is not None:
            # Bad bytes or an uploader's uncommon part sizes: only a download can tell (completion.check).
            log.warning("%s: the local copy in the %s cannot be shown to match the object: its part sizes are "
                        "not known; not serving it (the object is downloaded instead)", quoted(obj.uri),
                        copy.layer.label)
            return _Judged("")
        if verified == UNVERIFIED:
            what = "the lock names no checksum" if self.pinned else "S3 offers nothing"
            return _Judged(self._by_size(obj, copy, f"{what} to check the local copy against"))
        self._record(obj, copy, verified)
        return _Judged(verified)

    def _without_store(self, obj: RemoteObject, copy: LocalCopy, error: RemoteError, listings: int) -> _Judged:
        """The object store cannot be reached: check the copy against the
        listing's ETag where that can be done (a match is final), else by size;
        either verdict until the next listing succeeds."""
        exp = listed_expectation(obj, self.etag_is_md5)
        if exp is not None:
            try:
                verify.check(copy.fd, obj.size, exp, quoted(obj.uri))
            except IntegrityError:
                if exp.exact:  # (an ETag that is not an MD5, as with SSE-KMS, does not match either)
                    log.warning("%s: the local copy in the %s does not match the listed ETag, and the object "
                                "store cannot be reached (%s); not serving it until the object store answers, "
                                "then checking it again", quoted(obj.uri), copy.layer.label, error)
                    return _Judged("", listings)
            else:
                self._record(obj, copy, exp.algorithm)
                return _Judged(exp.algorithm)
        what = "the listing names nothing to check it against" if exp is None else \
            "its multipart ETag does not match the part sizes assumed"
        return _Judged(self._by_size(obj, copy, f"cannot check the local copy's content without the object store "
                                                f"({error}), and {what}", until_answered=True), listings)

    def _by_size(self, obj: RemoteObject, copy: LocalCopy, why: str, until_answered: bool = False) -> str:
        """Only its size vouches for the copy: used unpinned (SIZE), not served pinned ("")."""
        if self.pinned:
            log.warning("%s: %s, so it cannot be shown to be the locked version; not serving the copy in the %s",
                        quoted(obj.uri), why, copy.layer.label)
            return ""
        log.warning("%s: %s; using it as its size matches%s", quoted(obj.uri), why,
                    ", until the object store answers: the next open then checks its content" if until_answered
                    else "")
        return SIZE

    def _record(self, obj: RemoteObject, copy: LocalCopy, verified: str) -> None:
        if copy.layer.writable:
            try:
                self.store.identities.write(copy.fd, Identity.of(obj, "prebaked", verified))
            except OSError as e:  # a read-only copy we may not stamp: checked again next start
                log.debug("%s: cannot record the check's result: %s", quoted(obj.uri), e.strerror)


def _memo_key(obj: RemoteObject, label: str, st: os.stat_result) -> tuple[object, ...]:
    return (label, obj.key, obj.etag, st.st_ino, st.st_mtime_ns, st.st_size)


def probe_store(store: Store, obj: RemoteObject, *, may_fetch: bool, open_partial: bool, block_size: int,
                check_prebaked: PrebakedAccept | None, may_link: bool) -> Verdict:
    """`open_partial`: open the sparse file now (saves a hop), unless the
    cache budget must make room first.  `may_link`: a file stored under
    another path with the same ETag and size may stand in for it."""
    copy = store.find_current(obj, check_prebaked)  # a rejected copy is passed over for a later layer's
    if copy is not None:
        return Local(copy)
    if may_fetch or may_link:
        try:
            store.healer.check()  # its folders removed under the mount: made again (storeheal.py)
        except StoreError as e:
            raise StoreError(f"{quoted(obj.uri)}: {e}", e.errno) from None
    try:
        copy = store.materialise(obj) if may_link else None
    except (OSError, StoreError) as e:
        ran_out = isinstance(e, OSError) and e.errno in (errno.ENOSPC, *DESCRIPTOR_ERRNOS)  # room, a descriptor
        said = no_room(e, store.root.fd) if isinstance(e, OSError) and ran_out else str(e)
        log.warning("%s: could not reuse an identical local file: %s", quoted(obj.uri), said)
    if copy is not None:
        return Local(copy)
    if not may_fetch:
        return Unavailable()
    lock = store.partials.lock(obj)
    if lock is None:
        return Foreign()
    if not open_partial:
        return Fetch(lock, None)
    try:
        return Fetch(lock, open_partial_file(store, obj, block_size))
    except BaseException:
        store.partials.unlock(obj, lock)
        raise


def open_partial_file(store: Store, obj: RemoteObject, block_size: int) -> Partial:
    try:
        return store.partials.open(obj, block_size)
    except StoreError:
        raise
    except OSError as e:
        raise StoreError(f"{quoted(obj.uri)}: cannot create a download file in the store: "
                         f"{no_room(e, store.partials.tmp_fd)}",
                         e.errno or errno.EIO) from None


class LateVerdict:
    """Hands a probe's verdict from its worker thread to an open that may have
    stopped waiting (the store's filesystem stopped answering and the open
    gave up after --read-deadline, or the open was cancelled): a verdict
    nobody takes any more is released (descriptors closed, the download's
    store lock dropped) by the thread that made it, or, if it came just as
    the open gave up, by the caller of `abandon`."""

    def __init__(self, store: Store, obj: RemoteObject) -> None:
        self._store, self._obj = store, obj
        self._lock = threading.Lock()
        self._abandoned = False
        self._made: Verdict | None = None

    def run(self, probe: Callable[[], Verdict]) -> Verdict:
        """In the worker thread."""
        verdict = probe()
        with self._lock:
            if not self._abandoned:
                self._made = verdict
                return verdict
        release(self._store, self._obj, verdict)
        return verdict

    def taken(self) -> None:
        """The open got the verdict (trio thread)."""
        with self._lock:
            self._made = None

    def abandon(self) -> Verdict | None:
        """The open stops waiting (trio thread): a verdict already made and
        never taken, for the caller to release off the trio thread."""
        with self._lock:
            self._abandoned = True
            made, self._made = self._made, None
        return made


def release(store: Store, obj: RemoteObject, verdict: Verdict) -> None:
    """Give back what a verdict holds (blocking)."""
    if isinstance(verdict, Local):
        os.close(verdict.copy.fd)
    elif isinstance(verdict, Fetch):
        if verdict.partial is not None:
            verdict.partial.close()
        store.partials.unlock(obj, verdict.lock_fd)


def released(result: Any) -> None:
    """The end of a late verdict's release (its own thread; `result` is
    trio's outcome of it): say if it failed."""
    try:
        result.unwrap()
    except Exception as e:
        log.warning("could not release what a store probe held after its open gave up: %s", e)
