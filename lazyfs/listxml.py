"""ListObjectsV2 pages and S3 timestamps read without botocore's generic
parser (remote.py registers the hook; this module imports no botocore)."""

from __future__ import annotations

import calendar
import email.utils
import logging
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Any, Callable

from lazyfs import listanswers
from lazyfs.namespace import RemoteObject

log = logging.getLogger(__name__)


def etag(raw: str) -> str:
    return raw.strip('"')


def mtime_ns(value: Any) -> int:
    """Last-Modified as integer seconds in ns.  botocore hands timestamps over
    unparsed (see Remote.__init__): ISO 8601 in listings, an HTTP date in
    HEAD and GET responses.  A date no parser understands (some S3-compatible
    stores send odd ones) is 0, the epoch: it only dates the file."""
    try:
        if isinstance(value, str):
            if value[:4].isdigit():  # 2026-12-01T21:33:43.000Z
                secs = calendar.timegm((int(value[0:4]), int(value[5:7]), int(value[8:10]),
                                        int(value[11:13]), int(value[14:16]), int(value[17:19])))
            else:  # Tue, 01 Dec 2026 21:33:43 GMT
                parsed = email.utils.parsedate(value)
                secs = calendar.timegm(parsed) if parsed else 0
            return secs * 1_000_000_000
        return int(value.timestamp()) * 1_000_000_000
    except (ValueError, TypeError, AttributeError, OverflowError):
        log.debug("unparsable Last-Modified %r", value)
        return 0


def listed(bucket: str, item: dict[str, Any]) -> RemoteObject:
    """One entry of a listing botocore parsed itself (the slow path)."""
    algos = item.get("ChecksumAlgorithm") or ()
    return RemoteObject(bucket=bucket, key=item["Key"], size=int(item["Size"]),
                        etag=etag(item.get("ETag", "")), mtime_ns=mtime_ns(item["LastModified"]),
                        checksum_algorithm=algos[0] if algos else "")


# -- listings without botocore's generic parser ---------------------------------
#
# A 1000-key ListObjectsV2 page costs botocore about 45 ms of CPU to parse into
# dicts (after the timestamp fix above); ElementTree reads the same page in
# about 20, and listings are what a mount of a large folder waits for.  The
# `before-parse` hook (botocore's documented extension point) reads a
# successful page's XML itself and hands botocore a stub; errors take
# botocore's normal path.  A 200 that is no listing (an HTML page, an empty
# body, XML botocore could not parse and would call a 500) fails the listing
# saying what it was (listanswers.py), never lists nothing.

_STUB = (b'<?xml version="1.0" encoding="UTF-8"?>'
         b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"></ListBucketResult>')


def register(events: Any, s3_200_errors: Callable[..., None]) -> None:
    """Hook `parse_listing_fast` into a client's events, ahead of botocore's
    handler `s3_200_errors` (botocore.handlers._handle_200_error), which runs
    before every other and makes a 200 whose body is not XML a 500 ("kept
    failing (500: Internal Server Error)" for an answer that was a 200): a
    listing's answer is read here first, and what is left to that handler
    is only an <Error> sent with 200 (retried as a 500, as botocore does)."""

    def before_parse(operation_model: Any, response_dict: dict[str, Any],
                     customized_response_dict: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if operation_model.name == "ListObjectsV2":
            parse_listing_fast(response_dict, customized_response_dict)
        s3_200_errors(operation_model=operation_model, response_dict=response_dict, **kwargs)

    events.unregister("before-parse.s3.*", s3_200_errors)
    events.register_first("before-parse.s3.*", before_parse)


def parse_listing_fast(response_dict: dict[str, Any], customized_response_dict: dict[str, Any] | None = None,
                        **kwargs: Any) -> None:
    """A 200 answer read here: a listing, or why it is none (listanswers.py;
    `listing` then raises).  Either way botocore parses only the stub."""
    if customized_response_dict is None or response_dict.get("status_code") != 200:
        return
    body = response_dict.get("body")
    if not isinstance(body, (bytes, bytearray)):
        return
    read = _read(bytes(body), response_dict.get("headers") or {})
    if read is not None:
        customized_response_dict["LazyfsListing"] = read
        response_dict["body"] = _STUB


Page = tuple[list[tuple[str, int, str, str, str]], list[str], bool, "str | None"]


def _read(body: bytes, headers: Any) -> Page | str | None:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return listanswers.not_xml(headers, body)
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag == ns + "Error":
        return None  # left to botocore: an S3 error sent with 200
    if root.tag != ns + "ListBucketResult" or not root.findtext(ns + "Name"):
        return listanswers.not_listing(headers, root.tag.removeprefix(ns))
    decode = (root.findtext(ns + "EncodingType") or "") == "url"
    unquote = urllib.parse.unquote_plus if decode else (lambda v: v)
    key, size, etag, mtime, algo = (ns + "Key", ns + "Size", ns + "ETag", ns + "LastModified",
                                    ns + "ChecksumAlgorithm")
    try:
        contents = [(unquote(c.findtext(key) or ""), int(c.findtext(size) or 0), c.findtext(etag) or "",
                     c.findtext(mtime) or "", c.findtext(algo) or "") for c in root.iter(ns + "Contents")]
    except ValueError:
        return listanswers.BAD_SIZE
    prefixes = [unquote(p.findtext(ns + "Prefix") or "") for p in root.iter(ns + "CommonPrefixes")]
    return (contents, prefixes, (root.findtext(ns + "IsTruncated") or "").lower() == "true",
            root.findtext(ns + "NextContinuationToken"))


def listing(bucket: str, prefix: str, resp: dict[str, Any]) -> tuple[list[RemoteObject], list[str], bool, str | None]:
    fast = resp.get("LazyfsListing")
    if isinstance(fast, str):
        raise listanswers.unreadable(bucket, prefix, fast)
    if fast is not None:
        contents, prefixes, truncated, token = fast
        objects = [RemoteObject(bucket=bucket, key=k, size=n, etag=etag(e), mtime_ns=mtime_ns(m),
                                checksum_algorithm=a) for k, n, e, m, a in contents]
        return objects, prefixes, truncated, token
    try:
        objects = [listed(bucket, item) for item in resp.get("Contents", ())]
    except (ValueError, TypeError):
        raise listanswers.unreadable(bucket, prefix, listanswers.BAD_SIZE) from None
    return (objects, [p["Prefix"] for p in resp.get("CommonPrefixes", ())], bool(resp.get("IsTruncated")),
            resp.get("NextContinuationToken"))
