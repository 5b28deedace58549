"""Serving a lock (`--lock`, issue 14): a mount or a bake that serves
exactly the versions a lock pins, and nothing else, ever.

- The listing is the lock's (Catalog.start_pinned): no LIST at start, and no
  refresh replaces it (drift.py only reports how the bucket moved on).
- Each file is fetched by its version id when the lock has one, else pinned
  by If-Match to its locked ETag (RemoteObject.version_id: remote.py, crt.py).
- Its bytes are checked against the lock's checksum before they are
  published: `PinnedStore` answers what the engine asks about a locked
  version (a HEAD naming its ETag, its part sizes) from the lock, and `guard`
  gives every response the lock's verification hints, whichever transfer
  client sent the request.  The engine itself is unchanged.
- A version pinned by ETag (no version id: written before the bucket's
  versioning was on) that the key no longer holds is asked for as version
  "null", where S3 keeps it after an overwrite, still with If-Match on the
  locked ETag (`guard`); a drift check asks a HEAD of it the same way.
- A locked version the object store no longer has (overwritten or deleted
  in a bucket that keeps no versions, or its version deleted for good) fails
  its download with PinnedVersionGone (ESTALE), in one log line naming the
  key, the locked and the current identity; later opens of it fail at once
  (`refuse`, an engine hook) unless the store has a copy, until a drift
  check finds it back.

The refusals are written by network threads (a failed GET) and the trio
thread (a drift check), so they live under their own lock (docs/concurrency.md).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import Callable

from lazyfs import crt
from lazyfs.config import FetchConfig
from lazyfs.crtlimits import MIN_MEMORY
from lazyfs.errors import LazyfsError, ObjectChanged, ObjectNotFound, PinnedVersionGone, RemoteError, RemoteUnavailable
from lazyfs.lockfile import CHECKSUMS, ETAG_CHECKS, Entry, Lock
from lazyfs.modeljson import Source
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import Body, HeadInfo, ListPage, ObjectStore, ResponseMeta
from lazyfs.ranged_get import RangeJob, fetch_range_blocking
from lazyfs.verify import Part
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

FetchRange = Callable[[RangeJob], None]

# S3's id of an object written before versioning was turned on (or while it
# was suspended): an overwrite since keeps it under this id.
NULL_VERSION = "null"


def as_null(job: RangeJob) -> RangeJob:
    """`job` asking for version "null" (?versionId=null), its If-Match kept."""
    return dataclasses.replace(job, obj=dataclasses.replace(job.obj, version_id=NULL_VERSION))


def locked_meta(e: Entry) -> ResponseMeta:
    """What a response for the locked version is checked against: the lock's checksum."""
    check = e.check
    checksum = (check.algorithm, check.value, "FULL_OBJECT") if check and check.algorithm in CHECKSUMS else None
    return ResponseMeta(etag_is_md5=check is not None and check.algorithm in ETAG_CHECKS, checksum=checksum)


class PinnedStore:
    """An ObjectStore that answers from the lock what the engine asks about a
    locked version, and forwards everything else to the real one."""

    def __init__(self, inner: ObjectStore, lock: Lock) -> None:
        self.inner = inner
        self.endpoint = inner.endpoint
        self._entries = {(e.bucket, e.key): e for e in lock.entries()}

    def entry(self, obj: RemoteObject) -> Entry | None:
        """The lock's entry for exactly this version of `obj`, if it pins it."""
        e = self._entries.get((obj.bucket, obj.key))
        return e if e is not None and (e.etag, e.size) == (obj.etag, obj.size) else None

    def list_page(self, bucket: str, prefix: str, *, delimiter: bool = False, start_after: str = "",
                  token: str | None = None, max_keys: int = 1000) -> ListPage:
        return self.inner.list_page(bucket, prefix, delimiter=delimiter, start_after=start_after, token=token,
                                    max_keys=max_keys)

    def list_some(self, bucket: str, prefix: str, max_keys: int = 1000) -> tuple[list[RemoteObject], bool]:
        return self.inner.list_some(bucket, prefix, max_keys)

    def probe(self, source: Source) -> ListPage:
        return self.inner.probe(source)

    def head(self, bucket: str, key: str, etag: str | None = None, version_id: str = "") -> HeadInfo:
        """Asked with the locked ETag (what to check a download against; is
        it still that version?): the lock's answer, no request.  Otherwise
        (what is current?) the object store's."""
        e = self._entries.get((bucket, key))
        if etag and e is not None and e.etag == etag:
            meta = locked_meta(e)
            return HeadInfo(e.obj(), meta.checksum, meta.etag_is_md5, e.version_id)
        return self.inner.head(bucket, key, etag, version_id=version_id)

    def part(self, obj: RemoteObject, number: int) -> Part | None:
        """Part sizes the store confirmed when the lock was made (all of them,
        or part 1 and the count), from the lock.  Another part of a locked
        version (only bytes that do not match the sizes the lock assumes ask)
        is asked of that very version, by its version id; without one, it is
        not asked (None: the store cannot say): the store would describe
        whatever the key holds now, maybe another version, and a pinned mount
        asks about nothing but the locked versions.  The file is then
        unverified: a copy is not served, a download (by If-Match on the
        locked ETag) is published unverified, never called corrupt."""
        e = self.entry(obj)
        if e is None:
            return self.inner.part(obj, number)
        check = e.check
        if check is not None and check.algorithm == "MD5-multipart" and (check.exact or number == 1):
            sizes = check.part_sizes
            return Part(sizes[number - 1], len(sizes)) if 1 <= number <= len(sizes) else None
        return self.inner.part(e.obj(), number) if e.version_id else None

    def versioning(self, bucket: str) -> str | None:
        return self.inner.versioning(bucket)

    def get_range(self, obj: RemoteObject, start: int, end: int) -> Body:
        return self.inner.get_range(obj, start, end)


class Pinning:
    """A lock applied to one process's engine (a mount's or a bake's)."""

    def __init__(self, lock: Lock, remote: ObjectStore) -> None:
        self.lock = lock
        self.store = PinnedStore(remote, lock)
        # A mount's paths are its keys: one entry per key.  Counted once, for
        # the stats file (read on the trio thread at every open of it).
        self.entries = {e.key: e for e in lock.entries()}
        self.files, self.bytes = len(self.entries), sum(e.size for e in self.entries.values())
        self.by_version_id = sum(1 for e in self.entries.values() if e.version_id)
        # key -> why the locked version cannot be fetched
        self._refused: dict[str, str] = {}
        # Keys pinned by ETag whose locked bytes the bucket keeps as version "null" (fetched so).
        self._by_null: set[str] = set()
        self._refused_lock = threading.Lock()

    def objects(self) -> list[RemoteObject]:
        return self.lock.objects()

    def transfer(self, remote: object, cfg: FetchConfig, memory_limit: int = MIN_MEMORY) -> FetchRange:
        """The ranged GETs of --transfer-client (boto3 or crt), guarded."""
        fetch = crt.transfer_for(remote, cfg, memory_limit) or functools.partial(fetch_range_blocking, self.store)
        return self.guard(fetch)

    def guard(self, fetch: FetchRange) -> FetchRange:
        """`fetch` for locked versions: every response is checked against the
        lock, and a version the store no longer has is PinnedVersionGone."""

        def pinned_fetch(job: RangeJob) -> None:
            e = self.store.entry(job.obj)
            if e is None:
                fetch(job)
                return
            meta, told = locked_meta(e), job.got_meta
            locked = dataclasses.replace(job, got_meta=lambda _response: told(meta))
            by_null = not e.version_id and self.kept_as_null(e.key)
            try:
                fetch(as_null(locked) if by_null else locked)
                return
            except (ObjectChanged, ObjectNotFound):
                if e.version_id or by_null:
                    self.forget_null(e.key)
                    raise self.gone(e) from None
            # Pinned by ETag, and the key holds another object now.  Written
            # before versioning was on, the locked bytes may be kept as version
            # "null": asked for by that id, still with If-Match on the locked
            # ETag (the GETs of both clients carry it), so nothing else is served.
            try:
                fetch(as_null(locked))
            except (ObjectChanged, ObjectNotFound):
                raise self.gone(e) from None
            except RemoteUnavailable:
                raise  # unreachable or failing: EIO, and the next open tries again
            except RemoteError as x:  # a store that refuses versionId=null (400): as before
                log.debug("%s: version null not fetched: %s", e.key, x)
                raise self.gone(e) from None
            if self._remember_null(e.key):
                log.info("%s: the key holds another object now; serving the locked %s, kept by the bucket as "
                         "version null", quoted(f"s3://{e.bucket}/{e.key}"), e.describe())

        return pinned_fetch

    def kept_as_null(self, key: str) -> bool:
        """Is `key`'s locked version fetched as version "null" (found so)?"""
        with self._refused_lock:
            return key in self._by_null

    def _remember_null(self, key: str) -> bool:
        """From now on fetch `key` as version null; False if it was already."""
        with self._refused_lock:
            known = key in self._by_null
            self._by_null.add(key)
        return not known

    def forget_null(self, key: str) -> None:
        with self._refused_lock:
            self._by_null.discard(key)

    def null_holds_locked(self, e: Entry) -> bool:
        """Blocking (a HEAD ?versionId=null with If-Match on the locked ETag):
        does the bucket keep `e`, pinned by ETag, as version null?  False when
        it does not, cannot say or refuses the question (as before)."""
        try:
            info = self.store.inner.head(e.bucket, e.key, e.etag, version_id=NULL_VERSION)
        except RemoteError as x:
            log.debug("%s: version null not found: %s", e.key, x)
            return False
        return (info.obj.etag, info.obj.size) == (e.etag, e.size)

    def gone(self, e: Entry) -> PinnedVersionGone:
        """The locked version could not be fetched: what the bucket holds now
        (one HEAD; blocking, in the network thread that failed), remembered
        so that later opens fail at once."""
        versions: bool | None = None  # does the bucket keep versions (unknown: None)?
        try:
            info = self.store.inner.head(e.bucket, e.key)
            vid = f", version {info.version_id}" if info.version_id else ""
            now = f"it now holds ETag {info.obj.etag}, {info.obj.size} bytes{vid}"
            versions = bool(info.version_id)
        except ObjectNotFound:
            now = "it now holds nothing at that key"
        except RemoteError as x:
            now = f"what it holds now is unknown ({x})"
        why = self.why(e, now, versions)
        self.mark_unavailable(e, why)
        return PinnedVersionGone(why, bucket=e.bucket, key=e.key)

    def why(self, e: Entry, now: str, versions: bool | None = None) -> str:
        """The line saying `e` cannot be served; `versions`: the bucket keeps
        versions now (its current object has a version id), None if unknown.
        An entry pinned by ETag in a bucket that keeps versions was written
        before versioning was on (version "null"): S3 keeps it as an older
        version until that is deleted (or replaced by a write while versioning
        is suspended), and `guard` asked for it as such, in vain."""
        how = "by its version id" if e.version_id else "by ETag (the lock has no version id to fetch it by)"
        if e.version_id or versions is False:
            gone = "which the bucket no longer has"
        elif versions:
            gone = ("which is no longer the object at that key, and which the bucket does not serve as version "
                    "null either (its version null is another object, deleted, or not served by this store)")
        else:
            gone = "which the key no longer holds"
        return f"{self.lock.short_digest} pins {e.describe()} {how}, {gone}: {now}; nothing else is served in its place"

    def mark_unavailable(self, e: Entry, why: str) -> bool:
        """Refuse opens of `e` from now on; False if they were refused already."""
        with self._refused_lock:
            known = e.key in self._refused
            self._refused[e.key] = why
        return not known

    def mark_available(self, key: str) -> None:
        with self._refused_lock:
            self._refused.pop(key, None)

    def refuse(self, obj: RemoteObject) -> LazyfsError | None:
        """Fetcher hook: the error an open of `obj` fails with at once (logged
        already, when the version was found gone), or None."""
        with self._refused_lock:
            why = self._refused.get(obj.key)
        if why is None:
            return None
        err = PinnedVersionGone(why, bucket=obj.bucket, key=obj.key)
        err.logged = True  # type: ignore[attr-defined]  # once, when it was found
        return err

    def unavailable(self) -> list[str]:
        with self._refused_lock:
            return sorted(self._refused)
