"""An in-memory object store with the interface of lazyfs.remote.Remote
(lazyfs.objectstore.ObjectStore), for the engine tier: it counts calls, and
on cue fails, stalls, breaks a body off, or replaces an object.  Listings
page, start after a key and roll folders up as S3's do, so tests can count
the requests a listing costs.  A bucket may keep versions
(`keep_versions`): every put is then a new version with an id, a GET or a
part HEAD of an object naming a version id reads that version, and a delete
leaves the older versions readable by id.

Blocking like the real one (the engine calls it from worker threads); every
stall waits on a threading.Event the test releases, with a timeout so a
forgotten gate fails the test instead of hanging it.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import threading
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from lazyfs.errors import ObjectChanged, ObjectNotFound, RemoteError, RemoteUnavailable
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import HeadInfo, ListPage, ResponseMeta
from lazyfs.verify import Part

GATE_TIMEOUT = 20.0


@dataclass
class Gate:
    """GETs of `key` whose range starts in [start, end) wait here until released
    (or fail, like a connection that dies)."""

    key: str
    start: int = 0
    end: int | None = None
    in_body: bool = False  # park after the first piece of the body, not before the headers
    event: threading.Event = field(default_factory=threading.Event)
    waiting: int = 0  # requests parked here right now
    failed: bool = False

    def matches(self, key: str, start: int) -> bool:
        return key == self.key and self.start <= start < (self.end if self.end is not None else 1 << 62)

    def release(self) -> None:
        self.event.set()

    def fail(self) -> None:
        self.failed = True
        self.event.set()

    def wait(self) -> None:
        self.waiting += 1
        try:
            if not self.event.wait(GATE_TIMEOUT):
                raise RemoteUnavailable(f"test gate on {self.key} was never released")
            if self.failed:
                raise RemoteUnavailable(f"{self.key}: connection reset (test gate)")
        finally:
            self.waiting -= 1


@dataclass
class Stored:
    data: bytes
    etag: str
    mtime_ns: int
    checksum: tuple[str, str, str] | None = None
    parts: tuple[int, ...] = ()  # part sizes of a multipart upload
    says_parts: bool = True  # False: ignores partNumber, as Ceph RGW and s3rver
    version_id: str = ""  # in a bucket that keeps versions
    lists_checksum: bool = True  # False: a HEAD tells the checksum, a listing does not (SeaweedFS)


@dataclass
class Call:
    op: str
    key: str  # a LIST's prefix
    start: int = 0
    end: int = 0
    after: str = ""  # a LIST's StartAfter
    token: str | None = None  # a LIST's continuation token
    delimiter: bool = False
    version_id: str = ""  # the version a GET or a part HEAD asked for


class FakeRemote:
    endpoint = "memory://fake"

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], Stored] = {}
        self.calls: list[Call] = []
        self.gates: list[Gate] = []
        self._lock = threading.Lock()
        # Callables run at the start of each GET (after it is counted): cues.
        self.on_get: list[Callable[[Call], None]] = []
        self.fail_gets: dict[str, list[BaseException]] = {}
        # Callables run at the start of each LIST (after it is counted): cues
        # that fail it (raise) or hold it (wait on a Gate).
        self.on_list: list[Callable[[Call], None]] = []
        self._keys: dict[str, list[str]] = {}  # per bucket, sorted; rebuilt after a put
        self.versioned: set[str] = set()  # buckets that keep versions
        self.versioning_status: dict[str, str] = {}  # bucket -> "Enabled" or "Suspended", once turned on
        self.history: dict[tuple[str, str], list[Stored]] = {}  # every version kept, oldest first
        # Keys listed as usual whose GETs and HEADs answer 404 (ObjectNotFound), as SeaweedFS's for a
        # while after a link flap, or a replica that lags behind the listing.
        self.not_found: set[str] = set()

    # -- the test's side -----------------------------------------------------------

    def put(self, bucket: str, key: str, data: bytes, checksum: str = "", parts: tuple[int, ...] = (),
            says_parts: bool = True, lists_checksum: bool = True) -> RemoteObject:
        """Store an object and return it as listed: an MD5 ETag, or with `parts`
        a multipart upload's ETag; a CRC32 checksum if asked, over the whole
        object or ("CRC32-composite", with `parts`) composite, as boto3's
        multipart uploads carry it."""
        assert not parts or sum(parts) == len(data)
        pieces = [data[sum(parts[:i]):sum(parts[:i + 1])] for i in range(len(parts))]
        value = None
        if checksum == "CRC32":
            value = ("CRC32", base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode(), "FULL_OBJECT")
        if checksum == "CRC32-composite":
            crcs = b"".join(zlib.crc32(p).to_bytes(4, "big") for p in pieces)
            composite = base64.b64encode(zlib.crc32(crcs).to_bytes(4, "big")).decode()
            value = ("CRC32", f"{composite}-{len(parts)}", "COMPOSITE")
        etag = hashlib.md5(data).hexdigest()
        if parts:
            md5s = b"".join(hashlib.md5(p).digest() for p in pieces)
            etag = f"{hashlib.md5(md5s).hexdigest()}-{len(parts)}"
        stored = Stored(data, etag, time.time_ns() // 10**9 * 10**9, value, parts, says_parts,
                        lists_checksum=lists_checksum)
        with self._lock:
            if bucket in self.versioned:
                stored.version_id = f"v{sum(len(h) for h in self.history.values()) + 1}-{etag[:8]}"
                before = self.objects.get((bucket, key))
                if before is not None and not before.version_id and bucket in self.versioning_status:
                    # Written before versioning was on: S3 keeps it as version "null".
                    self.history.setdefault((bucket, key), []).append(replace(before, version_id="null"))
                self.history.setdefault((bucket, key), []).append(stored)
            self.objects[(bucket, key)] = stored
            self._keys.pop(bucket, None)
        return self._listed(bucket, key, stored)

    def keep_versions(self, bucket: str, on: bool = True) -> None:
        """Turn versioning on for `bucket` (objects put from now on get ids),
        or suspend it (puts get none, as S3's "null" version; the versions
        kept stay readable by their ids)."""
        if on:
            self.versioned.add(bucket)
        else:
            self.versioned.discard(bucket)
        self.versioning_status[bucket] = "Enabled" if on else "Suspended"

    def version_ids(self, bucket: str, key: str) -> list[str]:
        """The ids of every version kept of `key`, oldest first."""
        return [s.version_id for s in self.history.get((bucket, key), [])]

    def delete_version(self, bucket: str, key: str, version_id: str) -> None:
        """Delete one version for good (the current one too, if it is that)."""
        with self._lock:
            kept = self.history.get((bucket, key), [])
            self.history[(bucket, key)] = [s for s in kept if s.version_id != version_id]
            current = self.objects.get((bucket, key))
            if current is not None and current.version_id == version_id:
                del self.objects[(bucket, key)]
                self._keys.pop(bucket, None)

    def corrupt(self, bucket: str, key: str, at: int = 0) -> None:
        """Flip a byte of what GETs return, keeping the ETag and checksum: bad bytes in transit."""
        with self._lock:
            stored = self.objects[(bucket, key)]
            data = bytearray(stored.data)
            data[at] ^= 0xFF
            stored.data = bytes(data)

    def misreport_checksum(self, bucket: str, key: str) -> None:
        """Report a wrong checksum for the object (its bytes and ETag stay
        right): a store that computes it differently."""
        with self._lock:
            stored = self.objects[(bucket, key)]
            assert stored.checksum is not None
            algorithm, _, kind = stored.checksum
            wrong = base64.b64encode(b"\0\0\0\0").decode()
            stored.checksum = (algorithm, f"{wrong}-{len(stored.parts)}" if kind == "COMPOSITE" else wrong, kind)

    def delete(self, bucket: str, key: str) -> None:
        with self._lock:
            del self.objects[(bucket, key)]
            self._keys.pop(bucket, None)

    def gate(self, key: str, start: int = 0, end: int | None = None, in_body: bool = False) -> Gate:
        g = Gate(key, start, end, in_body=in_body)
        self.gates.append(g)
        return g

    def gets(self, key: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.op == "GET" and (key is None or c.key == key)]

    def count(self, op: str) -> int:
        return sum(1 for c in self.calls if c.op == op)

    def lists(self) -> list[Call]:
        return [c for c in self.calls if c.op == "LIST"]

    # -- the ObjectStore interface ----------------------------------------------------

    def list_page(self, bucket: str, prefix: str, *, delimiter: bool = False, start_after: str = "",
                  token: str | None = None, max_keys: int = 1000) -> ListPage:
        """As S3: keys after `start_after` (the token is the last entry of the
        previous page), folders rolled up by delimiter, at most `max_keys`
        entries (a folder counts once)."""
        call = Call("LIST", prefix, after=start_after, token=token, delimiter=delimiter)
        self._record(call)
        for cue in list(self.on_list):
            cue(call)
        after = token or start_after
        keys = self._sorted_keys(bucket)
        i = bisect.bisect_right(keys, after) if after > prefix else bisect.bisect_left(keys, prefix)
        objects: list[RemoteObject] = []
        folders: list[str] = []
        last = ""
        while i < len(keys) and keys[i].startswith(prefix):
            if len(objects) + len(folders) == max_keys:
                return ListPage(objects, folders, next_token=last)
            key = keys[i]
            rest = key[len(prefix):]
            if delimiter and "/" in rest:
                last = prefix + rest.split("/", 1)[0] + "/"
                if last > after:
                    folders.append(last)
                i = bisect.bisect_left(keys, last[:-1] + "0")  # past every key under it ("0" follows "/")
                continue
            objects.append(self._listed(bucket, key, self.objects[(bucket, key)]))
            last = key
            i += 1
        return ListPage(objects, folders)

    def list_pages(self, bucket: str, prefix: str, delimiter: bool = False,
                   page_size: int = 1000) -> Iterator[tuple[list[RemoteObject], list[str]]]:
        """Every page under `prefix` (the interface before list_page)."""
        token = None
        while True:
            page = self.list_page(bucket, prefix, delimiter=delimiter, token=token, max_keys=page_size)
            yield page.objects, page.folders
            if page.next_token is None:
                return
            token = page.next_token

    def list_some(self, bucket: str, prefix: str, max_keys: int = 1000) -> tuple[list[RemoteObject], bool]:
        page = self.list_page(bucket, prefix, max_keys=max_keys)
        return page.objects, page.truncated

    def probe(self, source: Any) -> ListPage:
        return self.list_page(source.bucket, source.prefix, max_keys=100)

    def head(self, bucket: str, key: str, etag: str | None = None, version_id: str = "") -> HeadInfo:
        self._record(Call("HEAD", key, version_id=version_id))
        if version_id:
            stored = self._version(RemoteObject(bucket=bucket, key=key, size=0, etag=etag or "", mtime_ns=0,
                                                version_id=version_id))
        else:
            stored = self._current(bucket, key, etag)
        return HeadInfo(self._listed(bucket, key, stored), stored.checksum, etag_is_md5=True,
                        version_id="" if stored.version_id == "null" else stored.version_id)  # as remote.py says

    def part(self, obj: RemoteObject, number: int) -> Part | None:
        self._record(Call("HEAD", obj.key, number, version_id=obj.version_id))
        stored = self._version(obj) if obj.version_id else self._current(obj.bucket, obj.key, None)
        if not stored.says_parts:  # the whole object's length, no parts count
            return Part(len(stored.data), 0)
        if not stored.parts or not 1 <= number <= len(stored.parts):
            return None
        return Part(stored.parts[number - 1], len(stored.parts))

    def versioning(self, bucket: str) -> str | None:
        self._record(Call("VERSIONING", ""))
        return self.versioning_status.get(bucket, "")

    def get_range(self, obj: RemoteObject, start: int, end: int) -> FakeBody:
        call = Call("GET", obj.key, start, end, version_id=obj.version_id)
        self._record(call)
        for cue in list(self.on_get):
            cue(call)
        failures = self.fail_gets.get(obj.key)
        if failures:
            raise failures.pop(0)
        gate = self._gate_for(obj.key, start)
        if gate is not None and not gate.in_body:
            gate.wait()
        stored = self._version(obj) if obj.version_id else self._current(obj.bucket, obj.key, obj.etag)
        whole = start == 0 and end == obj.size
        meta = ResponseMeta(etag_is_md5=True, checksum=stored.checksum if whole else None)
        return FakeBody(stored.data[start:end], meta, gate if gate is not None and gate.in_body else None)

    # -- helpers ------------------------------------------------------------------------

    def _record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def _sorted_keys(self, bucket: str) -> list[str]:
        with self._lock:
            keys = self._keys.get(bucket)
            if keys is None:
                keys = self._keys[bucket] = sorted(k for b, k in self.objects if b == bucket)
            return keys

    def _gate_for(self, key: str, start: int) -> Gate | None:
        for g in self.gates:
            if g.matches(key, start) and not g.event.is_set():
                return g
        return None

    def _current(self, bucket: str, key: str, etag: str | None) -> Stored:
        with self._lock:
            stored = None if key in self.not_found else self.objects.get((bucket, key))
        if stored is None:
            raise ObjectNotFound(f"s3://{bucket}/{key} no longer exists", bucket=bucket, key=key)
        if etag and stored.etag != etag:
            raise ObjectChanged(f"s3://{bucket}/{key} changed in the object store", bucket=bucket, key=key)
        return stored

    def _version(self, obj: RemoteObject) -> Stored:
        """The version `obj.version_id` names, as S3 answers ?versionId= (with If-Match on its ETag)."""
        with self._lock:
            found = [s for s in self.history.get((obj.bucket, obj.key), []) if s.version_id == obj.version_id
                     and obj.key not in self.not_found]
        if not any(b == obj.bucket for b, _ in self.history):  # never kept versions
            raise RemoteError(f"{obj.uri}: InvalidArgument: Invalid version id specified", bucket=obj.bucket,
                              key=obj.key)
        if not found:
            raise ObjectNotFound(f"{obj.uri} no longer exists", bucket=obj.bucket, key=obj.key)
        if obj.etag and found[0].etag != obj.etag:
            raise ObjectChanged(f"{obj.uri} changed in the object store", bucket=obj.bucket, key=obj.key)
        return found[0]

    @staticmethod
    def _listed(bucket: str, key: str, stored: Stored) -> RemoteObject:
        return RemoteObject(bucket, key, len(stored.data), stored.etag, stored.mtime_ns,
                            stored.checksum[0] if stored.checksum and stored.lists_checksum else "")


class FakeBody:
    def __init__(self, data: bytes, meta: ResponseMeta, gate: Gate | None) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self.meta = meta
        self._gate = gate

    def read(self, n: int) -> bytes:
        if self._gate is not None and self._pos > 0:
            self._gate.wait()  # the first piece arrived; the rest waits
        out = bytes(self._data[self._pos:self._pos + n])
        self._pos += len(out)
        return out

    def close(self) -> None:
        pass


__all__ = ["FakeRemote", "Gate", "RemoteError"]
