"""One request of the CRT client (crt.py) as it is answered: its headers
checked (answers.py) before a byte is written, its parts written into the
sparse file from the client's threads, and its failure in lazyfs's words.

The client shows a request's headers once, those of its first part: crt.py
sends one part per request, so every GET's answer is checked here.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable

from lazyfs import answers
from lazyfs.errors import (
    DENIED_CODES,
    AccessDenied,
    ObjectChanged,
    ObjectNotFound,
    OutOfDescriptors,
    RemoteError,
    RemoteUnavailable,
    StoreError,
    WrongRange,
)
from lazyfs.exhausted import descriptors
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import ResponseMeta, broke_off
from lazyfs.ranged_get import RangeJob
from lazyfs.storewrite import PieceWriter, WriterClosed
from lazyfs.wording import quoted

_CHECKSUMS = ("crc64nvme", "crc32c", "crc32", "sha256", "sha1")
_GAVE_UP_ON = {"AWS_ERROR_S3_INTERNAL_ERROR": (500, "InternalError"), "AWS_ERROR_S3_SLOW_DOWN": (503, "SlowDown")}
# The CRT's failures to reach the object store at all, in words (its names say them to
# no operator): said as boto3 says such a failure, with the host the CRT tried.
_UNREACHABLE = {"AWS_IO_DNS_INVALID_NAME": "DNS name not found", "AWS_IO_DNS_QUERY_FAILED": "DNS lookup failed",
                "AWS_IO_DNS_NO_ADDRESS_FOR_HOST": "DNS name has no address",
                "AWS_IO_SOCKET_CONNECTION_REFUSED": "connection refused",
                "AWS_IO_SOCKET_TIMEOUT": "connection timed out", "AWS_IO_SOCKET_NO_ROUTE_TO_HOST": "no route to host",
                "AWS_IO_SOCKET_NETWORK_DOWN": "network down",
                "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE": "TLS negotiation failed",
                "AWS_IO_TLS_ERROR_ALERT_RECEIVED": "TLS negotiation failed (the server refused it)"}
# The CRT's own refusals of an answer that ignored the Range header (a body it would not take), in words.
_RANGE_IGNORED = {"AWS_ERROR_S3_MISSING_CONTENT_RANGE_HEADER": "an answer without Content-Range",
                  "AWS_ERROR_DEST_COPY_TOO_SMALL": "more bytes than asked"}
# The client's refusals of an answer it does not show (its headers never reach on_headers): crt.py asks
# again to see them (its _look_again, checked by `refusal`), else these words.
UNSHOWN = frozenset(_RANGE_IGNORED)
# Answers the client cannot read at all (a header no parser takes: a Content-Length "-5" or "abc", a size in
# Content-Range past 2^64), in words; such headers from boto3 are said as they came (answers.py).
_UNREADABLE = {"AWS_ERROR_S3_INVALID_CONTENT_RANGE_HEADER": "a Content-Range the CRT client cannot read",
               "AWS_ERROR_HTTP_PROTOCOL_ERROR": "an answer that is not valid HTTP (a malformed header, such as a "
                                                "Content-Length that is no length)"}


def refusal(state: Received, status: int, headers: list[tuple[str, str]]) -> RemoteError | None:
    """What is wrong with an answer (`status`, `headers`) to the request `state` made, in answers.py's
    words, or None."""
    h = {k.lower(): v for k, v in headers}
    try:
        answers.check(state.job.obj, state.start, state.end, status, h.get("content-range"), h.get("etag"),
                      h.get("content-length"), h.get("content-type"), h.get("content-encoding"))
    except RemoteError as e:
        return e
    return None


def translate(e: Exception, obj: RemoteObject, state: Received, url: Callable[[], str]) -> RemoteError:
    """The CRT's failure of one request in lazyfs's words (`url()`: the scheme and host it was sent to)."""
    status = getattr(e, "status_code", None) or state.status
    where = quoted(obj.uri)
    name = getattr(e, "name", type(e).__name__)
    if name in _RANGE_IGNORED:  # nothing of it was handed over; trying again would get the same
        return answers.ignored_range(obj, state.start, state.end, _RANGE_IGNORED[name])
    if name == "AWS_ERROR_S3_INVALID_CONTENT_RANGE_HEADER":  # the same again: not retried
        return WrongRange(f"{where}: the object store (or a proxy) answered a request for bytes {state.start}-"
                          f"{state.end - 1} with {_UNREADABLE[name]} ({name}); {answers.NOTHING_WRITTEN}",
                          bucket=obj.bucket, key=obj.key)
    if name in _UNREADABLE:  # retried: a connection's bytes garbled may pass
        return RemoteUnavailable(state.broke_off(f"{_UNREADABLE[name]}: {name}"), bucket=obj.bucket, key=obj.key)
    if (shorter := answers.unsatisfiable(obj, state.start, state.end, status)) is not None:
        return shorter  # a 416 for bytes inside its size: another version, as a 412
    if status == 412:
        return ObjectChanged(f"{where} changed in the object store", bucket=obj.bucket, key=obj.key)
    if status == 404:
        return ObjectNotFound(f"{where} no longer exists", bucket=obj.bucket, key=obj.key)
    if status == 403:
        return AccessDenied(f"access denied to {where}", bucket=obj.bucket, key=obj.key)
    # After its retries the client reports a 500 or 503 by name only.
    status, code = (status, "") if status else _GAVE_UP_ON.get(name, (0, ""))
    if status >= 300:
        found = re.search(rb"<Code>([^<]{1,64})</Code>", getattr(e, "body", None) or b"")
        code = found.group(1).decode(errors="replace") if found else code or name
        if status in answers.REDIRECTS:  # never followed (answers.py): where it pointed, said
            h = {k.lower(): v for k, v in getattr(e, "headers", None) or []}
            endpoint = re.search(rb"<Endpoint>([^<]{1,300})</Endpoint>", getattr(e, "body", None) or b"")
            location = h.get("location") or (endpoint.group(1).decode(errors="replace") if endpoint else None)
            return answers.redirected(obj.bucket, obj.key, "GET", status, code if found else "", location,
                                      h.get("x-amz-bucket-region"))
        if code in DENIED_CODES:  # an expired or unknown token, a bad key: as boto3's (remote.py)
            message = re.search(rb"<Message>([^<]{1,300})</Message>", getattr(e, "body", None) or b"")
            said = message.group(1).decode(errors="replace") if message else code
            return AccessDenied(f"access denied to {where} ({code}: {said})", bucket=obj.bucket, key=obj.key)
        if 400 <= status < 500 and status not in (408, 429):  # refused (a 400 for ?versionId=null): as boto3's
            return RemoteError(f"{where}: {code}: HTTP {status}", bucket=obj.bucket, key=obj.key)
        return Answered(obj, f"{code}: HTTP {status}")
    if name == "AWS_ERROR_MAX_FDS_EXCEEDED":  # a socket's EMFILE or ENFILE, which the CRT does not tell
        # apart: the daemon's limit, by far the likelier (fs.file-max is huge on current kernels).
        return OutOfDescriptors(f"{where}: cannot open a connection to the object store: {descriptors()}",
                                bucket=obj.bucket, key=obj.key)
    if name in _UNREACHABLE and not state.status:  # no answer: the connection itself failed
        return RemoteUnavailable(f"cannot reach the object store at {url()} ({_UNREACHABLE[name]}: {name})",
                                 bucket=obj.bucket, key=obj.key)
    return RemoteUnavailable(state.broke_off(name), bucket=obj.bucket, key=obj.key)


class Answered(RemoteUnavailable):
    """One attempt the object store answered with an error status: said as
    such in its retry's line, "kept failing" only once the retries are spent
    (as botocore's, clientretries.py and remote.py)."""

    def __init__(self, obj: RemoteObject, answer: str) -> None:
        super().__init__(f"{quoted(obj.uri)}: {answer}", bucket=obj.bucket, key=obj.key)
        self.obj = obj
        self.answer = answer  # "SlowDown: HTTP 503"

    def kept_failing(self) -> RemoteUnavailable:
        return RemoteUnavailable(f"{quoted(self.obj.uri)}: object store kept failing ({self.answer})",
                                 bucket=self.bucket, key=self.key)


class Received:
    """One request's progress, written from the CRT's threads."""

    def __init__(self, job: RangeJob, writer: PieceWriter, start: int, whole: bool, etag_is_md5: bool,
                 end: int | None = None) -> None:
        self.job = job
        self.end = job.end if end is None else end  # this request's bytes: [start, end) (a block after a stall)
        self._writer = writer
        self.etag_is_md5 = etag_is_md5  # the store's ETags can be MD5s at all (--no-etag-check: no)
        self.start = start  # this request's first byte
        self.reached = start  # bytes [job.start, reached) are in the file
        self.whole = whole
        self.status = 0
        self.stalled = False  # cancelled here for want of bytes (the client never retried it)
        self.active = time.monotonic()
        self.error: BaseException | None = None
        self.part_size = 0  # the client's parts of this request: one GET each
        self.parts = 0  # parts that arrived (each is handed over whole, from its first byte)
        self.encoding = ""  # a Content-Encoding: the client says a part's length, not what came (on_body)
        self._lock = threading.Lock()

    def transient(self) -> bool:
        """Whether trying the request again may help: no answer (a refused or
        reset connection), a stall, a body cut short, a 5xx or throttling;
        not another 4xx, which says the same again."""
        return self.stalled or self.status in (0, 200, 206, 429) or self.status >= 500

    def broke_off(self, why: str) -> str:
        # The client hands over a part only once all of it has arrived.
        return broke_off(self.job.obj, self.start, self.end, self.reached - self.start, why)

    def on_headers(self, status_code: int, headers: list[tuple[str, str]], **kwargs: Any) -> None:
        self.status = status_code
        self.active = time.monotonic()
        if status_code >= 300:
            return
        h = {k.lower(): v for k, v in headers}
        self.encoding = h.get("content-encoding", "").strip()
        # the bytes asked for, of this version, or none of them is written (on_body drops them)
        self.error = refusal(self, status_code, headers)
        if self.error is not None:
            return
        sse = h.get("x-amz-server-side-encryption", "")
        checksum = None
        if self.whole:
            for algo in _CHECKSUMS:
                value = h.get(f"x-amz-checksum-{algo}")
                if value:
                    kind = h.get("x-amz-checksum-type") or ("COMPOSITE" if "-" in value or
                                                            "-" in h.get("etag", "") else "FULL_OBJECT")
                    checksum = (algo.upper(), value, kind)
                    break
        ok = self.etag_is_md5 and sse in ("", "AES256") and not h.get("x-amz-server-side-encryption-customer-algorithm")
        self.job.got_meta(ResponseMeta(etag_is_md5=ok, checksum=checksum))

    def on_progress(self, progress: int, **kwargs: Any) -> None:
        self.active = time.monotonic()

    def on_body(self, chunk: bytes, offset: int, **kwargs: Any) -> None:
        self.active = time.monotonic()
        if self.part_size and (offset - self.start) % self.part_size == 0:
            with self._lock:
                self.parts += 1
        if self.error is not None:
            return
        job = self.job
        if self.encoding.lower() not in ("", "identity") and self.part_size and \
                len(chunk) < min(self.part_size, self.end - offset):  # a part re-encoded (its headers said its length)
            self.error = answers.reencoded(job.obj, offset, min(offset + self.part_size, self.end), len(chunk),
                                           self.encoding)
            return
        try:
            self._writer.write(chunk, offset)
        except WriterClosed:
            return
        except StoreError as e:
            self.error = e
            return
        with self._lock:
            if offset <= self.reached:
                self.reached = max(self.reached, offset + len(chunk))
                job.posted(self.reached - job.start)
