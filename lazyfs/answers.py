"""A GET's answer checked against what was asked, before a byte of it is
written where a reader can see it (both transfer clients: remote.py, crt.py).

HTTP lets a server ignore `Range` (a 200 with the whole object), and a cache
or an S3-compatible gateway may answer another range, or ignore `If-Match`
(s3rver does) and serve whatever version the key holds now.  Written at the
asked offset, such bytes reach readers of a file as it arrives, and a file
S3 offers nothing to check against (SSE-KMS, `--no-etag-check`, a multipart
ETag of unconfirmed part sizes) would be published with them.  So a ranged
GET must answer 206 with `Content-Range: bytes START-LAST/SIZE` exactly as
asked, a whole-object GET 200 (or a 206 covering it all) of the object's
length, and the response's ETag, when it sends one (S3 always does), must be
the one the GET pinned.  A store that honours If-Match compares against the
ETag it answers with, so this refuses nothing such a store sends.

An ETag or a Content-Range total size that differs is the object changed
(ObjectChanged: ESTALE, the new version fetched whole), and so is a 416 (Range
Not Satisfiable) for bytes inside the size the object is known by: it is
shorter now (`unsatisfiable`), the same evidence; other bytes than asked
are WrongRange (EIO, not retried: the store would answer the same).  A 200 of
another length with the listed ETag or none is other bytes, not another
version: a proxy's error page (`text/html`, no ETag), a body it re-encoded
(`Content-Encoding: gzip`).  An object stored with a Content-Encoding is
served with it at its listed length, its stored bytes: that passes.  Quotes and a weak `W/`
prefix are not part of the tag: `W/` is what a proxy adds (nginx, when it
compresses), and the tag still names the version; whether the bytes are the
ones asked is what the range and the length say.

A Content-Length or a Content-Range size no file can have (negative, not a
number, past 2^63-1: st_size is a signed 64-bit number) is no answer about
any version: WrongRange, saying the value (`possible_length`).

An answer that redirects (301, 302, 307, 308: a moved or wrong-region bucket,
a proxy pointing elsewhere) is never followed: requests, signed with the
user's credentials, go only to the endpoint configured (botocore's own
wrong-region retry for AWS, which it resolves itself, aside).  It fails
naming the status and where it pointed (`redirected`), without a query
string, which in a presigned URL holds credentials.

Per request, on the hot path: one string comparison when all is well.
"""

from __future__ import annotations

import urllib.parse

from lazyfs.errors import ObjectChanged, RemoteError, WrongRange
from lazyfs.namespace import MAX_SIZE, RemoteObject
from lazyfs.wording import one_line, quoted

NOTHING_WRITTEN = "nothing of it was written"


def same_etag(answered: str, listed: str) -> bool:
    """Do two ETags name the same version (quotes and a weak `W/` aside)?"""
    return answered.removeprefix("W/").strip('"') == listed.strip('"')


def check_etag(bucket: str, key: str, pinned: str, answered: str | None, request: str = "GET") -> None:
    """ObjectChanged unless a `request` pinned by If-Match to ETag `pinned`
    was answered by it (or by no ETag at all: nothing to tell)."""
    if answered and pinned and not same_etag(answered, pinned):
        raise changed(bucket, key, f"a {request} pinned to ETag {_tag(pinned)} was answered with ETag "
                                   f"{_tag(answered)}: the object store (or a cache in front of it) ignored If-Match")


def possible_length(sent: str | int | None) -> int | str | None:
    """A Content-Length as sent (its text, or botocore's int of it): the
    length, or when no file can have it (negative, not a number, past
    2^63-1) what was sent, as text; None when none was."""
    if sent is None or isinstance(sent, int):
        return sent if sent is None or 0 <= sent <= MAX_SIZE else str(sent)
    text = sent.strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) <= MAX_SIZE else sent


def impossible(obj: RemoteObject, start: int, end: int, what: str) -> WrongRange:
    """A GET of bytes [start, end) answered with a header `what` no file can have."""
    return WrongRange(f"{quoted(obj.uri)}: the object store (or a proxy) answered a request for bytes "
                      f"{start}-{end - 1} with {what}, a size no file can have; {NOTHING_WRITTEN}",
                      bucket=obj.bucket, key=obj.key)


def check(obj: RemoteObject, start: int, end: int, status: int, content_range: str | None, etag: str | None,
          length: int | str | None, content_type: str | None = None, encoding: str | None = None) -> None:
    """Raise unless a GET of bytes [start, end) of `obj` was answered with
    them: `status`, its Content-Range, ETag and Content-Length (None: not
    sent; its text: see possible_length), with its Content-Type and
    Content-Encoding to say what came.  ObjectChanged for another version,
    WrongRange for other bytes."""
    check_etag(obj.bucket, obj.key, obj.etag, etag)
    length = possible_length(length)
    if isinstance(length, str):
        raise impossible(obj, start, end, f"Content-Length {quoted(length)}")
    if status == 206:
        if content_range != f"bytes {start}-{end - 1}/{obj.size}":
            _another_range(obj, start, end, content_range)
    elif status != 200:
        raise WrongRange(f"{quoted(obj.uri)}: the object store answered a request for bytes {start}-{end - 1} with "
                         f"HTTP {status}; {NOTHING_WRITTEN}", bucket=obj.bucket, key=obj.key)
    elif length is not None and length != obj.size:  # the listed ETag or none: not evidence of another version
        raise _other_body(obj, length, etag, content_type, encoding)
    elif start != 0 or end != obj.size:
        raise ignored_range(obj, start, end, "HTTP 200 with the whole object")
    if length is not None and length != end - start and encoding and encoding.strip().lower() != "identity":
        raise reencoded(obj, start, end, length, encoding)
    if length is not None and length != end - start:
        raise WrongRange(f"{quoted(obj.uri)}: the object store answered {length} bytes to a request for bytes "
                         f"{start}-{end - 1} ({end - start} bytes); {NOTHING_WRITTEN}", bucket=obj.bucket, key=obj.key)


def _another_range(obj: RemoteObject, start: int, end: int, content_range: str | None) -> None:
    """A 206 whose Content-Range is not the one expected: the bytes asked of
    a size unknown (`*`) pass; another size is another version; other bytes
    are WrongRange."""
    span, _, total = (content_range or "").removeprefix("bytes ").partition("/")
    if total == "*" and span == f"{start}-{end - 1}":
        return
    if content_range and total != "*" and isinstance(possible_length(total), str):
        raise impossible(obj, start, end, f"Content-Range {quoted(content_range)}")
    if content_range and total not in ("*", str(obj.size)):
        raise changed(obj.bucket, obj.key, f"answered with Content-Range {quoted(content_range)}, not of the "
                                           f"listed {obj.size} bytes")
    said = f"bytes {one_line(span)}" if content_range else "HTTP 206 without a Content-Range"
    raise WrongRange(f"{quoted(obj.uri)}: the object store answered {said} to a request for bytes {start}-{end - 1}; "
                     f"{NOTHING_WRITTEN}", bucket=obj.bucket, key=obj.key)


def _other_body(obj: RemoteObject, length: int, etag: str | None, content_type: str | None,
                encoding: str | None) -> WrongRange:
    """A 200 of another length than the object's, with its ETag or none: a
    proxy's error page, a body it re-encoded; not another version."""
    if encoding and encoding.strip().lower() != "identity":
        said = f"{length} bytes with Content-Encoding: {one_line(encoding)} for an object of {obj.size} bytes"
    else:
        kind = f", Content-Type {one_line(content_type)}" if content_type else ""
        tag = f", ETag {_tag(etag)}" if etag else ", no ETag"
        said = f"HTTP 200, {length} bytes{kind}{tag}, for the object of {obj.size} bytes"
    return WrongRange(f"{quoted(obj.uri)}: the object store (or a proxy) answered {said}; {NOTHING_WRITTEN}",
                      bucket=obj.bucket, key=obj.key)


def reencoded(obj: RemoteObject, start: int, end: int, received: int, encoding: str) -> WrongRange:
    """A part of bytes [start, end) came as `received` bytes of `encoding`
    (the CRT reports the length asked, not the one sent: crt.py)."""
    return WrongRange(f"{quoted(obj.uri)}: the object store (or a proxy) answered {received} bytes with "
                      f"Content-Encoding: {one_line(encoding)} for bytes {start}-{end - 1} ({end - start} bytes) of an "
                      f"object of {obj.size} bytes; {NOTHING_WRITTEN}", bucket=obj.bucket, key=obj.key)


def changed(bucket: str, key: str, why: str) -> ObjectChanged:
    return ObjectChanged(f"{quoted(f's3://{bucket}/{key}')} changed in the object store", bucket=bucket, key=key,
                         detail=f" ({why})")


def unsatisfiable(obj: RemoteObject, start: int, end: int, status: int, code: str = "") -> ObjectChanged | None:
    """A GET of bytes [start, end) of `obj` refused with `status` (S3's error
    `code`): for a 416 (InvalidRange) of a range inside the size `obj` is
    known by (listed, or pinned by a lock), the object changed; else None."""
    if (status != 416 and code != "InvalidRange") or not 0 <= start < end <= obj.size:
        return None
    said = "HTTP 416" + (f" {one_line(code)}" if code and code != "416" else "")
    return changed(obj.bucket, obj.key, f"a GET of bytes {start}-{end - 1} was answered with {said}, Range Not "
                                        f"Satisfiable: the object is shorter now than the listed {obj.size} bytes")


def ignored_range(obj: RemoteObject, start: int, end: int, how: str) -> WrongRange:
    """The store ignored the Range header (`how`: what it sent instead)."""
    return WrongRange(f"{quoted(obj.uri)}: the object store ignored the Range header ({how}, for bytes "
                      f"{start}-{end - 1}); {NOTHING_WRITTEN}", bucket=obj.bucket, key=obj.key)


def _tag(etag: str) -> str:
    return quoted(etag.removeprefix("W/").strip('"'))


REDIRECTS = (301, 302, 303, 307, 308)


def redirected(bucket: str, key: str, request: str, status: int, code: str, location: str | None,
               region: str | None = None) -> RemoteError:
    """A `request` answered with a redirect (`status`, S3's error `code` if
    any), to `location` (its Location header, or S3's <Endpoint>), the
    bucket's `region` if the store said it (x-amz-bucket-region): not
    followed, said with where it pointed."""
    where = f" to {quoted(_no_secrets(location))}" if location else " (no Location)"
    said = f"HTTP {status}" + (f" {one_line(code)}" if code and code != str(status) else "")
    also = f", the bucket's region {quoted(region)}" if region else ""
    return RemoteError(f"{quoted(f's3://{bucket}/{key}')}: the object store answered a {request} with {said}, a "
                       f"redirect{where}{also}; not followed (requests go only to the endpoint configured: "
                       "set --endpoint-url or the region to where the bucket is)", bucket=bucket, key=key)


def _no_secrets(location: str) -> str:
    """`location` without user:password@, query (a presigned URL's signature and credential) or fragment."""
    try:
        url = urllib.parse.urlsplit(location.strip())
        host = url.hostname or ""
        port = f":{url.port}" if url.port else ""
    except ValueError:  # no URL: said up to any query
        return location.split("?", 1)[0].split("#", 1)[0]
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = host + port
    return urllib.parse.urlunsplit((url.scheme, netloc, url.path, "", ""))
