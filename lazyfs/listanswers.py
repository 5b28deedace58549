"""A LIST's answer judged before a listing is built from it (pure: the
checks and their words; listxml.py and lister.py apply them).

A server that answers ListObjectsV2 wrongly must fail the listing, never
shorten it: a listing taken as complete makes files that exist ENOENT, and a
saved one serves an offline start.  So, as a failed listing (BadListing),
each with one line naming the cause:
- an answer with status 200 that is not S3's XML, or not a ListBucketResult
  naming its bucket (every ListObjectsV2 answer does: AWS, MinIO, Ceph,
  SeaweedFS, moto): a proxy's HTML page, an empty body;
- an entry whose Size is not a number;
- a page that says the listing goes on (IsTruncated) with no continuation
  token to ask for the rest;
- a continuation token given again in one walk, or a page whose keys do not
  come after the last page's: a walk that would never end.
Only what is certainly no listing is refused: other elements (KeyCount,
IsTruncated itself) are not required, as some stores leave them out.
"""

from __future__ import annotations

from typing import Any, Mapping

from lazyfs.errors import BadListing
from lazyfs.wording import quoted


def _uri(bucket: str, prefix: str) -> str:
    return quoted(f"s3://{bucket}/{prefix}")


def not_xml(headers: Mapping[str, Any], body: bytes) -> str:
    """Why a 200 answer whose body is not XML is no listing."""
    kind = headers.get("content-type") or headers.get("Content-Type") or "none"
    what = "an empty body" if not body.strip() else "a body that is not S3's XML"
    return f"was not a listing: HTTP 200 with {what}, Content-Type {kind}"


def not_listing(headers: Mapping[str, Any], root: str) -> str:
    """Why a 200 answer of XML that is no ListBucketResult naming its bucket is no listing."""
    kind = headers.get("content-type") or headers.get("Content-Type") or "none"
    what = (f"<{root}>, no ListBucketResult" if root != "ListBucketResult"
            else "a ListBucketResult without the bucket's Name")
    return f"was not a listing: HTTP 200, Content-Type {kind}, {what}"


BAD_SIZE = "could not be read: a Size that is not a number"


def unreadable(bucket: str, prefix: str, said: str) -> BadListing:
    return BadListing(f"the object store's answer to LIST of {_uri(bucket, prefix)} {said}",
                      bucket=bucket, key=prefix)


def next_token(bucket: str, prefix: str, truncated: bool, token: str | None) -> str | None:
    """The token to ask for the next page with (None: the last page)."""
    if truncated and not token:
        raise BadListing(f"the object store said the listing of {_uri(bucket, prefix)} goes on but gave no "
                         "continuation token", bucket=bucket, key=prefix)
    return token if truncated else None


def looping(bucket: str, prefix: str, token: str | None, seen: set[str], after: str, last: str | None) -> None:
    """Raise if a walk would go round for ever: the next page's `token` was
    given before in it (`seen`), or a page's last key `last` does not come
    after `after`, the last key of the walk's earlier pages ("": none)."""
    if token is not None and token in seen:
        raise BadListing(f"the object store gave the same continuation token again while listing "
                         f"{_uri(bucket, prefix)}: the listing would never end", bucket=bucket, key=prefix)
    if last is not None and after and last <= after:
        raise BadListing(f"the object store listed {_uri(bucket, prefix)} from before {quoted(after)} again: "
                         "the listing would never end", bucket=bucket, key=prefix)
