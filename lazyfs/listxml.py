"""ListObjectsV2 pages and S3 timestamps read without botocore's generic
parser (remote.py registers the hook; this module imports no botocore)."""

from __future__ import annotations

import calendar
import email.utils
import logging
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Any

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
# successful page's XML itself and hands botocore a stub; errors, and anything
# unexpected, take botocore's normal path.

_STUB = (b'<?xml version="1.0" encoding="UTF-8"?>'
         b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"></ListBucketResult>')


def parse_listing_fast(response_dict: dict[str, Any], customized_response_dict: dict[str, Any] | None = None,
                        **kwargs: Any) -> None:
    if customized_response_dict is None or response_dict.get("status_code") != 200:
        return
    body = response_dict.get("body")
    if not isinstance(body, (bytes, bytearray)) or not body:
        return
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != ns + "ListBucketResult":
        return
    decode = (root.findtext(ns + "EncodingType") or "") == "url"
    unquote = urllib.parse.unquote_plus if decode else (lambda v: v)
    key, size, etag, mtime, algo = (ns + "Key", ns + "Size", ns + "ETag", ns + "LastModified",
                                    ns + "ChecksumAlgorithm")
    contents = [(unquote(c.findtext(key) or ""), int(c.findtext(size) or 0), c.findtext(etag) or "",
                 c.findtext(mtime) or "", c.findtext(algo) or "") for c in root.iter(ns + "Contents")]
    prefixes = [unquote(p.findtext(ns + "Prefix") or "") for p in root.iter(ns + "CommonPrefixes")]
    customized_response_dict["LazyfsListing"] = (
        contents, prefixes, (root.findtext(ns + "IsTruncated") or "").lower() == "true",
        root.findtext(ns + "NextContinuationToken"))
    response_dict["body"] = _STUB


def listing(bucket: str, resp: dict[str, Any]) -> tuple[list[RemoteObject], list[str], bool, str | None]:
    fast = resp.get("LazyfsListing")
    if fast is not None:
        contents, prefixes, truncated, token = fast
        objects = [RemoteObject(bucket=bucket, key=k, size=n, etag=etag(e), mtime_ns=mtime_ns(m),
                                checksum_algorithm=a) for k, n, e, m, a in contents]
        return objects, prefixes, truncated, token
    objects = [listed(bucket, item) for item in resp.get("Contents", ())]
    return (objects, [p["Prefix"] for p in resp.get("CommonPrefixes", ())], bool(resp.get("IsTruncated")),
            resp.get("NextContinuationToken"))
