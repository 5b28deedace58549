"""A LIST's answer judged before a listing is built from it (listanswers.py,
listxml.py): what is no listing, or none that can be followed, fails the
listing with a line naming the cause; a size no file can have is skipped."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from lazyfs import listxml
from lazyfs.errors import BadListing, RemoteFailing
from lazyfs.lister import Lister
from lazyfs.modeljson import Source
from lazyfs.namespace import RemoteObject, build_tree
from lazyfs.objectstore import ListPage

NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def page_xml(contents: str = "", name: str = "<Name>b</Name>", extra: str = "") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{NS}">{name}<Prefix>p/</Prefix>'
            f"{extra}{contents}</ListBucketResult>").encode()


def entry(key: str, size: str) -> str:
    return (f"<Contents><Key>{key}</Key><Size>{size}</Size><ETag>&quot;e&quot;</ETag>"
            "<LastModified>2026-12-01T21:33:43.000Z</LastModified></Contents>")


def answered(body: bytes, content_type: str = "application/xml") -> dict[str, Any]:
    """What botocore hands on after the hook: the parsed stub plus what the hook read."""
    response = {"status_code": 200, "body": body, "headers": {"content-type": content_type}}
    custom: dict[str, Any] = {}
    listxml.parse_listing_fast(response, custom)
    assert response["body"] == listxml._STUB  # botocore never parses (and never fails on) the body itself
    return custom


def test_a_real_page_lists() -> None:
    resp = answered(page_xml(entry("p/a", "5"), extra="<IsTruncated>true</IsTruncated>"
                                                      "<NextContinuationToken>t1</NextContinuationToken>"))
    objects, _, truncated, token = listxml.listing("b", "p/", resp)
    assert [(o.key, o.size) for o in objects] == [("p/a", 5)] and truncated and token == "t1"


@pytest.mark.parametrize(("body", "content_type", "said"), [
    (b"<html><body>Welcome to nginx!</body></html>", "text/html",
     "HTTP 200, Content-Type text/html, <html>, no ListBucketResult"),
    (b"", "text/plain", "HTTP 200 with an empty body, Content-Type text/plain"),
    (b"<!DOCTYPE html><html><body>login<br></body></html>", "text/html",
     "HTTP 200 with a body that is not S3's XML, Content-Type text/html"),
    (page_xml(name=""), "application/xml", "a ListBucketResult without the bucket's Name"),
    (page_xml(entry("p/a", "5"))[:-40], "application/xml", "a body that is not S3's XML"),
])
def test_a_200_that_is_no_listing_fails_the_listing(body: bytes, content_type: str, said: str) -> None:
    """Before: an HTML page or an empty body listed nothing (the mount emptied, the empty listing saved);
    malformed XML was botocore's "500: Internal Server Error"."""
    resp = answered(body, content_type)
    with pytest.raises(BadListing) as e:
        listxml.listing("b", "p/", resp)
    assert isinstance(e.value, RemoteFailing)  # a failed listing, as a 5xx-ing one: retried, the last one kept
    assert str(e.value).startswith("the object store's answer to LIST of \"s3://b/p/\" was not a listing: ")
    assert said in str(e.value)


def test_a_size_that_is_no_number_fails_the_listing_in_words() -> None:
    """Before: ValueError out of the hook, `unexpected ValueError: invalid literal for int()`, exit 1."""
    resp = answered(page_xml(entry("p/a", "5") + entry("p/b", "lots")))
    with pytest.raises(BadListing, match="LIST of \"s3://b/p/\" could not be read: a Size that is not a number"):
        listxml.listing("b", "p/", resp)


def test_truncated_without_a_token_fails_the_listing() -> None:
    """Before: taken as the last page, a listing complete with its first page."""
    from lazyfs import listanswers

    with pytest.raises(BadListing, match='listing of "s3://b/p/" goes on but gave no continuation token'):
        listanswers.next_token("b", "p/", True, None)
    assert listanswers.next_token("b", "p/", False, None) is None
    assert listanswers.next_token("b", "p/", False, "t") is None  # the last page, whatever else it says
    assert listanswers.next_token("b", "p/", True, "t") == "t"


class Looping:
    """A store whose listing never ends: the same token again, or new tokens for the same page."""

    endpoint = "http://loop"

    def __init__(self, same_token: bool) -> None:
        self.same_token = same_token
        self.calls = 0

    def list_page(self, bucket: str, prefix: str, **kwargs: Any) -> ListPage:
        self.calls += 1
        if self.calls > 50:
            raise AssertionError("still listing")
        objects = [RemoteObject(bucket, f"{prefix}{i:03d}", 1, "e", 0) for i in range(3)]
        if not kwargs.get("token"):
            objects = objects[:1]
        return ListPage(objects, [], next_token="t" if self.same_token else f"t{self.calls}")


@pytest.mark.parametrize("same_token", [True, False])
def test_a_listing_that_goes_round_fails(same_token: bool) -> None:
    """Before: 672 LISTs a minute, for ever, and every ls, stat and cat waited on it."""
    store = Looping(same_token)

    async def main() -> None:
        await Lister(store, trio.CapacityLimiter(2)).list_folder(Source("b", "p/"))  # type: ignore[arg-type]

    with pytest.raises(BadListing, match="the listing would never end"):
        trio.run(main)
    assert store.calls < 10


@pytest.mark.parametrize("size", [-5, 2**63, 2**64 + 7])
def test_a_size_no_file_can_have_is_skipped(size: int) -> None:
    """Before: OverflowError in readdir and lookup, `ls` EIO for the whole folder; -5 EIO with no line."""
    tree = build_tree([RemoteObject("b", "p/ok", 2**63 - 1, "e", 0), RemoteObject("b", "p/x", size, "e", 0)])
    assert tree.find("p/x") is None and tree.find("p/ok") is not None
    assert [(s.key, s.reason) for s in tree.skipped] == [("p/x", f"its listed size {size} is not possible")]


def test_a_listing_is_read_before_botocore_calls_a_200_a_500() -> None:
    """botocore's own first handler made a 200 with a body that is not XML a 500 before the listing's hook
    saw it; a botocore upgrade that renames or moves it must fail here, not bring that back."""
    import botocore.handlers
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    handler = botocore.handlers._handle_200_error  # type: ignore[attr-defined]
    events = client.meta.events
    assert handler in list(events._emitter._handlers.prefix_search("before-parse.s3.ListObjectsV2"))
    listxml.register(events, handler)
    assert handler not in list(events._emitter._handlers.prefix_search("before-parse.s3.ListObjectsV2"))
    response = {"status_code": 200, "body": b"<ListBucketResult><Name>b</Name", "headers": {}}
    custom: dict[str, Any] = {}
    events.emit("before-parse.s3.ListObjectsV2", operation_model=client.meta.service_model.operation_model(
        "ListObjectsV2"), response_dict=response, customized_response_dict=custom)
    assert response["status_code"] == 200 and "not S3's XML" in custom["LazyfsListing"]
    error = {"status_code": 200, "body": b"<Error><Code>InternalError</Code></Error>", "headers": {}}
    events.emit("before-parse.s3.ListObjectsV2", operation_model=client.meta.service_model.operation_model(
        "ListObjectsV2"), response_dict=error, customized_response_dict={})
    assert error["status_code"] == 500  # an S3 error sent with 200: botocore's, retried
