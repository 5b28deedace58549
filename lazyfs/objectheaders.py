"""An object's HEAD and GET answers as botocore hands them over (remote.py),
read into what lazyfs keeps of them: the object, its additional checksum,
its version id.  Imports no botocore: pure, tested in milliseconds.

A HEAD answered by something else than the store (a proxy's error page as a
`200 text/html`) lacks an object's headers: without an ETag or a
Content-Length it describes no object (a RemoteError in words, not a
KeyError); without a Last-Modified alone it is dated the epoch, as a listing
whose date cannot be parsed.  A Content-Length no file can have (negative,
not a number, past 2^63-1) is refused in words too (answers.possible_length),
never a size a file would be shown with, nor botocore's ValueError.

The HEAD of one part of a multipart object (verification's part sizes) is
checked the same way, and against the object: a length no file can have, one
past the object's, or a Content-Range that is not a part of it (another
total size, another span than its Content-Length) is WrongRange in words,
never a part size that fails the bytes' check as if they were corrupt."""

from __future__ import annotations

import re
from typing import Any

from lazyfs import answers, listxml
from lazyfs.errors import RemoteError, WrongRange
from lazyfs.namespace import RemoteObject
from lazyfs.verify import Part
from lazyfs.wording import one_line, quoted

# A HEAD's or a GET's Content-Length as sent, when botocore could not read it as a number (keep_sent_length).
SENT_LENGTH = "LazyfsContentLength"


def keep_sent_length(operation_model: Any, response_dict: dict[str, Any],
                     customized_response_dict: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """botocore's before-parse hook (remote.py): a HEAD's or a GET's
    Content-Length that is no integer ("abc") is taken out of the headers
    botocore parses (its ValueError, "invalid literal for int()", would be the
    line) and kept as sent, under SENT_LENGTH, to be refused in words."""
    headers = response_dict.get("headers")
    if operation_model.name not in ("HeadObject", "GetObject") or customized_response_dict is None or not headers:
        return
    sent = headers.get("content-length")
    if sent is not None and not re.fullmatch(r"\s*-?[0-9]+\s*", sent, re.ASCII):
        del headers["content-length"]
        customized_response_dict[SENT_LENGTH] = sent


def head_object(bucket: str, key: str, resp: dict[str, Any]) -> RemoteObject:
    """The object a HEAD's answer describes; RemoteError if it names none."""
    length, tag = answers.possible_length(resp.get(SENT_LENGTH, resp.get("ContentLength"))), resp.get("ETag")
    if isinstance(length, str):
        raise RemoteError(f"{quoted(f's3://{bucket}/{key}')}: the object store (or a proxy) answered a HEAD with "
                          f"Content-Length {quoted(length)}, a size no file can have: not an object's",
                          bucket=bucket, key=key)
    if length is None or not tag:
        lacks = " and ".join(h for h, v in (("an ETag", tag), ("a Content-Length", length is not None)) if not v)
        kind = resp.get("ContentType")
        came = f"HTTP {resp.get('ResponseMetadata', {}).get('HTTPStatusCode', '?')}" + (
            f", Content-Type {one_line(str(kind))}" if kind else "")
        raise RemoteError(f"{quoted(f's3://{bucket}/{key}')}: the object store (or a proxy) answered a HEAD with "
                          f"{came}, without {lacks}: not an object's", bucket=bucket, key=key)
    return RemoteObject(bucket=bucket, key=key, size=int(length), etag=listxml.etag(str(tag)),
                        mtime_ns=listxml.mtime_ns(resp.get("LastModified")))


def version_id(resp: dict[str, Any]) -> str:
    """The version id of a bucket that keeps versions.  "null" (an object
    written before versioning was enabled, or while it is suspended) names no
    version that stays: the next such write replaces it."""
    vid = str(resp.get("VersionId") or "")
    return "" if vid == "null" else vid


def checksum_of(resp: dict[str, Any]) -> tuple[str, str, str] | None:
    """(algorithm, value, kind) of the object's additional checksum, if any.
    A multipart object's checksum is full-object only when the store says so
    (x-amz-checksum-type): S3 writes composite ones as "<b64>-<parts>", but
    some stores (moto) send a composite value bare and without a type, and a
    full-object check against it would call correct bytes corrupt."""
    declared = resp.get("ChecksumType")
    multipart = "-" in listxml.etag(str(resp.get("ETag", "")))
    for algo in ("CRC64NVME", "CRC32C", "CRC32", "SHA256", "SHA1"):
        value = resp.get(f"Checksum{algo}")
        if value:
            if "-" in value:
                kind = "COMPOSITE"
            else:
                kind = declared or ("COMPOSITE" if multipart else "FULL_OBJECT")
            return (algo, value, kind)
    return None


_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)", re.ASCII)


def part_of(obj: RemoteObject, number: int, resp: dict[str, Any]) -> Part:
    """Part `number` of `obj` as a HEAD's answer (partNumber=) tells it: its
    size (0: not said) and how many parts the object has (0: not said, a
    store that ignores partNumber).  WrongRange when the answer is of no
    part of this object."""
    sent = resp.get(SENT_LENGTH, resp.get("ContentLength"))
    length, count = answers.possible_length(sent), int(resp.get("PartsCount") or 0)
    said = f"{quoted(obj.uri)}: the object store (or a proxy) answered a HEAD of part {number} with"
    if isinstance(length, str):
        raise WrongRange(f"{said} Content-Length {quoted(length)}, a size no file can have: not a part's",
                         bucket=obj.bucket, key=obj.key)
    if length is not None and length > obj.size:
        raise WrongRange(f"{said} Content-Length {length}, more than the object's {obj.size} bytes: not a part of it",
                         bucket=obj.bucket, key=obj.key)
    if (sent_range := resp.get("ContentRange")) is not None:
        m = _CONTENT_RANGE.fullmatch(str(sent_range).strip())
        span = int(m.group(2)) - int(m.group(1)) + 1 if m else None
        if m is None or int(m.group(3)) != obj.size or (length is not None and span != length):
            raise WrongRange(f"{said} Content-Range {quoted(one_line(str(sent_range)))} and Content-Length "
                             f"{'none' if length is None else length}: not a part of the object of {obj.size} bytes",
                             bucket=obj.bucket, key=obj.key)
    return Part(length or 0, count)
