"""A finished download's last steps, in a worker thread: check the bytes
against what the object store vouches for, then publish them into the store.
Blocking; writes no trio-side state (docs/concurrency.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import resource
import threading
from typing import Callable, Iterator

from lazyfs import verify
from lazyfs.errors import AccessDenied, IntegrityError, ObjectChanged, ObjectNotFound, RemoteUnavailable, StoreError
from lazyfs.exhausted import no_room
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import ObjectStore, ResponseMeta
from lazyfs.partials import Partial
from lazyfs.store import Store
from lazyfs.wording import quoted

log = logging.getLogger(__name__)


# From this size on, a file whose listing names no checksum is asked for one
# anyway (a HEAD): some stores (SeaweedFS) keep the CRC32 or CRC64NVME an
# uploader sent and answer it to a HEAD, but do not list it, and hashing a
# CRC64NVME costs a fifteenth of an MD5 (about 0.1 against 1.6 CPU s per GiB
# here).  Below it the request would cost more than the MD5 it might save.
ASK_FOR_A_CHECKSUM_FROM = 32 * 1024 * 1024


def expectation(remote: ObjectStore, obj: RemoteObject, meta: ResponseMeta | None = None,
                may_ask: bool = True) -> verify.Expectation | None:
    """What S3 vouches for.  The GETs' own headers usually say enough; a HEAD
    is sent when the listing shows a checksum the GETs did not carry (ranged
    responses never do) or may not show one (a big file; unless not
    `may_ask`: such a HEAD already failed), or when no GET was made."""
    checksum = meta.checksum if meta else None
    etag_is_md5 = meta.etag_is_md5 if meta else None
    needed = etag_is_md5 is None or (checksum is None and bool(obj.checksum_algorithm))
    part: verify.PartLookup = functools.partial(remote.part, obj)
    if needed or (may_ask and checksum is None and obj.size >= ASK_FOR_A_CHECKSUM_FROM):
        try:
            info = remote.head(obj.bucket, obj.key, etag=obj.etag)
            checksum, etag_is_md5 = info.checksum, info.etag_is_md5
        except (RemoteUnavailable, AccessDenied) as e:
            if needed:
                raise
            no_checksum_asked(obj, e)  # only asked in case the store keeps one: the GET said enough
        except (ObjectChanged, ObjectNotFound) as e:
            if etag_is_md5 is None:
                raise  # no GET of this version was answered: nothing vouches for the bytes
            # The GETs (If-Match on this ETag) were answered by this version, so
            # the bytes are its own: the replacement only leaves the HEAD
            # nothing to say about it.  Its ETag checks them; the store's parts
            # now describe the new object, so a multipart ETag is cut at a
            # common uploader's part size, or the file is unverified.
            replaced(obj, e)
            part = _nothing_known
    assert etag_is_md5 is not None
    return verify.choose(obj.etag, checksum, etag_is_md5, obj.size, part, guess=True)


def _nothing_known(number: int) -> verify.Part | None:
    return None


def listed_expectation(obj: RemoteObject, etag_is_md5: bool) -> verify.Expectation | None:
    """What the listing alone vouches for, with no request (the object store
    cannot be reached): the ETag as the content's MD5, or a multipart ETag
    cut at the first common uploader's part size that fits it (a guess: bytes
    that do not match it prove nothing).  Not the checksum: a listing names
    only its algorithm.  `etag_is_md5`: False with --no-etag-check; a listing
    cannot show an SSE-KMS ETag, which is not an MD5, so bytes that do not
    match an MD5 ETag are wrong only if the store's HEAD says it is one."""
    return verify.choose(obj.etag, None, etag_is_md5, obj.size, lambda n: None, guess=True)


def no_checksum_asked(obj: RemoteObject, why: Exception) -> None:
    """The one line for a HEAD that asked for a checksum the store may keep, and failed."""
    log.info("%s: cannot ask the object store for a checksum it may keep (%s); checking its ETag", quoted(obj.uri), why)


def replaced(obj: RemoteObject, why: Exception) -> None:
    """The one line for a HEAD after the GETs that found the object replaced or deleted."""
    how = ("replaced", why.detail) if isinstance(why, ObjectChanged) else ("deleted", "")  # (answers.py)
    log.info("%s: %s since its bytes were fetched%s; checking them by its ETag", quoted(obj.uri), *how)


UNVERIFIED = "unverified"


def check(remote: ObjectStore, fd: int, obj: RemoteObject, exp: verify.Expectation | None,
          cancelled: Callable[[], bool], hashed: verify.Hashed | None = None, again: bool = False) -> str:
    """Check the file against `exp`: how it was verified ("CRC32", "MD5",
    "MD5-multipart"...), or UNVERIFIED.  IntegrityError only on evidence:
    a multipart ETag computed from assumed part sizes that does not match
    is recomputed from each part's reported size first, the object is
    confirmed unchanged, and bytes that fail a checksum the store computed
    are checked against its MD5 ETag before they are called corrupt.  When
    the store cannot say its part sizes: a local copy (not `again`) is
    unverified; a download (`again`) is fetched once more and hashed
    (second_look): unverified if those bytes hash as its own do,
    IntegrityError if not."""
    if exp is None:
        log.info("%s: the object store offers nothing to check it against beyond its size; unverified", quoted(obj.uri))
        return UNVERIFIED
    if hashed is not None and hashed.exp == exp and hashed.size == obj.size and hashed.value == exp.value:
        return exp.algorithm  # hashed as the file filled (alongside.hash_along)
    # A running digest or pieces' sums that do not match decide nothing: the file is hashed from the disk.
    try:
        verified, got = _hashed_against(remote, fd, obj, exp, cancelled)
    except IntegrityError:
        info = remote.head(obj.bucket, obj.key, etag=obj.etag)  # ObjectChanged if it was replaced meanwhile
        by_etag = _second_opinion(remote, fd, obj, exp, info.etag_is_md5, cancelled)
        if by_etag:
            return by_etag
        raise
    if verified == UNVERIFIED:
        return _unconfirmed(remote, obj, exp, got, cancelled, again)
    return verified


_UNSAID = ("its multipart {what} does not match the part sizes assumed, and the size of each part cannot be "
           "learnt (the object store cannot say it, or a lock with no version id to ask by does not name it)")


def _unconfirmed(remote: ObjectStore, obj: RemoteObject, exp: verify.Expectation, got: str,
                 cancelled: Callable[[], bool], again: bool) -> str:
    """UNVERIFIED, or the error, for bytes that a multipart ETag or composite
    checksum cut at assumed part sizes does not match (check): bad bytes, or
    an uploader's uncommon part sizes, which the store cannot tell apart.  A
    download's are told apart by a second look (bytes that changed on the way
    do not change the same way twice); its readers wait for it, as for any
    verification (their last bytes are held, lastbytes.py), and are never
    failed for bytes that were right."""
    unsaid = _UNSAID.format(what="ETag" if exp.algorithm == "MD5-multipart" else "checksum")
    if not again:  # a local copy: its caller says what it does with it
        log.warning("%s: %s", quoted(obj.uri), unsaid)
        return UNVERIFIED
    log.info("%s: %s: fetching it once more to compare (bad bytes, or an uploader's uncommon part sizes)",
             quoted(obj.uri), unsaid)
    second = second_look(remote, obj, exp, cancelled)
    if second != got:
        raise IntegrityError(f"{quoted(obj.uri)}: {unsaid}, and the bytes fetched once more differ ({exp.algorithm} "
                             f"at the part sizes assumed: {got}, then {second}): bad bytes")
    log.warning("%s: %s; fetched once more, the same bytes (an uploader's uncommon part sizes), so its content is "
                "unverified", quoted(obj.uri), unsaid)
    return UNVERIFIED


_LOOK_SPAN = 64 << 20  # bytes per GET of the second look
_LOOK_READ = 1 << 20


def second_look(remote: ObjectStore, obj: RemoteObject, exp: verify.Expectation, cancelled: Callable[[], bool]) -> str:
    """What the object's bytes, fetched once more (pinned to its version as
    every GET is, streamed, kept nowhere), hash to in `exp`'s form."""
    digest = verify.Digest(exp)
    for start in range(0, obj.size, _LOOK_SPAN):
        end = min(obj.size, start + _LOOK_SPAN)
        body = remote.get_range(obj, start, end)
        try:
            while digest.fed < end:
                if cancelled():
                    raise InterruptedError("verification cancelled")
                data = body.read(min(_LOOK_READ, end - digest.fed))
                if not data:
                    raise RemoteUnavailable(f"{quoted(obj.uri)}: the object store's answer ended at {digest.fed} "
                                            f"bytes of {end}", bucket=obj.bucket, key=obj.key)
                digest.update(data)
        finally:
            body.close()
    return digest.value()


def _hashed_against(remote: ObjectStore, fd: int, obj: RemoteObject, exp: verify.Expectation,
                    cancelled: Callable[[], bool]) -> tuple[str, str]:
    """(exp.algorithm, the digest) when the file's bytes match `exp`; part
    sizes that were assumed and do not match are replaced by the ones the
    store tells, or give (UNVERIFIED, what the bytes hash to at the sizes
    assumed) when it cannot say.  IntegrityError otherwise."""
    got = verify.compute(fd, obj.size, exp, cancelled)
    if got == exp.value:
        return exp.algorithm, got
    if exp.per_part and not exp.exact:
        sizes = verify.exact_part_sizes(obj.size, len(exp.part_sizes), lambda n: remote.part(obj, n))
        if sizes is None:
            return UNVERIFIED, got
        if sizes != exp.part_sizes:
            told = dataclasses.replace(exp, part_sizes=sizes, exact=True)
            return _hashed_against(remote, fd, obj, told, cancelled)
    raise verify.mismatch(exp, got, quoted(obj.uri))


def _second_opinion(remote: ObjectStore, fd: int, obj: RemoteObject, exp: verify.Expectation,
                    etag_is_md5: bool, cancelled: Callable[[], bool]) -> str:
    """How bytes that do not match the store's checksum match its ETag
    ("MD5", "MD5-multipart"), or "" when they do not or it cannot tell.
    A store's checksum is a value it computed itself, and one that computes a
    composite or a CRC differently (or reports another upload's) would have
    every download of that object refused; an MD5 ETag that matches says the
    bytes are the ones uploaded (an accidental MD5 collision is not a risk),
    so the checksum is taken to be wrong, and said so.  Nothing is logged
    before the verdict: the file may yet be refused."""
    if exp.algorithm in ("MD5", "MD5-multipart"):
        return ""  # the ETag was the check: there is no second one
    etag_exp = verify.choose(obj.etag, None, etag_is_md5, obj.size, lambda n: remote.part(obj, n), guess=True)
    if etag_exp is None:
        return ""
    try:
        verified, _ = _hashed_against(remote, fd, obj, etag_exp, cancelled)
    except IntegrityError:
        return ""
    if verified == UNVERIFIED:
        return ""
    log.warning("%s: the bytes match the object's ETag but not the %s the object store reports (%s); "
                "its checksum is taken to be wrong and the file verified by the ETag", quoted(obj.uri),
                exp.algorithm, exp.value)
    return verified


def hash_more_blocking(fd: int, start: int, end: int, digest: verify.Digest, cancelled: Callable[[], bool]) -> None:
    """Feed bytes [start, end) to a running digest.  At the CPU priority of
    the downloads: a reader of the whole file waits for this hash at its last
    blocks (lastbytes.py), so a hash that yields to the download only moves
    the wait to the end.  (peer-bench, cold sequential 1 GiB with only an MD5
    ETag, one pair of alternating runs: 205-260 MB/s at the lower priority,
    253-299 at this one; a later A/B of the whole session's change was within
    the spread: on 2 busy CPUs the MD5's own CPU is the bound.)"""
    verify.feed(fd, start, end, digest, cancelled)


@dataclasses.dataclass(frozen=True, slots=True)
class Finished:
    verified: str  # how the bytes were checked (check()), or UNVERIFIED
    placed: bool  # in the store now (False: not kept, or a newer version was there first)
    not_kept: str = ""  # why it was not, for its line


def verify_and_publish_blocking(remote: ObjectStore, store: Store, partial: Partial, meta: ResponseMeta | None,
                                *, keep: bool, origin: str, cancelled: Callable[[], bool],
                                hashed: verify.Hashed | None = None, current: bool = False) -> Finished:
    """IntegrityError when the bytes are wrong, StoreError when
    they cannot be published.  `current`: the listing shows this very version
    now, so it is placed even over a file with a later Last-Modified (a
    rollback)."""
    obj = partial.obj
    with lower_priority():
        # What the file hashed to along the download was made for what S3
        # vouched for when it began (alongside.hash_along): asking again would
        # be a second HEAD, a round trip between the last byte and the publish.
        exp = hashed.exp if hashed is not None and hashed.size == obj.size else expectation(remote, obj, meta)
        # An empty file too: its bytes (none) against the ETag (the MD5 of
        # nothing) or checksum, as the HEAD already made tells, so it says
        # what it was checked by like any other file.
        verified = check(remote, partial.fd, obj, exp, cancelled, hashed, again=True)
        if not keep:
            return Finished(verified, placed=False, not_kept="larger than the cache budget")
        try:
            placed = store.publish(partial, origin, keep_newer=not current, verified=verified, listed=current)
        except OSError as e:
            raise StoreError(f"{quoted(obj.uri)}: cannot publish into the store: {no_room(e, store.root.fd)}",
                             e.errno or errno.EIO) from None
    return Finished(verified, placed, "" if placed else partial.not_kept)


@contextlib.contextmanager
def lower_priority() -> Iterator[None]:
    """Hash a finished download at a lower CPU priority than the downloads and
    readers still running (this thread only), when its priority can be
    restored afterwards: raising a nice value is always allowed, lowering it
    back needs CAP_SYS_NICE or RLIMIT_NICE, which containers do not grant by
    default.  Without either, the thread keeps its priority."""
    tid = threading.get_native_id()
    old = os.getpriority(os.PRIO_PROCESS, tid)
    if not _may_renice_to(old):
        yield
        return
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, old + 10))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, tid, old)


_CAP_SYS_NICE = 23


@functools.lru_cache(maxsize=64)
def _may_renice_to(nice: int) -> bool:
    """May this process lower a thread's nice value back to `nice`?"""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        caps = 0
    if caps & (1 << _CAP_SYS_NICE):
        return True
    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    return soft == resource.RLIM_INFINITY or 20 - soft <= nice
