"""objectheaders.head_object: a HEAD's answer read into the object it
describes, or refused in words when it describes none (a proxy's page)."""

from __future__ import annotations

import pytest

from lazyfs import objectheaders
from lazyfs.errors import RemoteError, WrongRange
from lazyfs.namespace import RemoteObject
from lazyfs.verify import Part

OK = {"ContentLength": 1700, "ETag": '"0cc175b9c0f1b6a831c399e269772661"',
      "LastModified": "Tue, 01 Dec 2026 21:33:43 GMT", "ResponseMetadata": {"HTTPStatusCode": 200}}


def test_an_objects_head_is_read() -> None:
    obj = objectheaders.head_object("b", "m/w.bin", OK)
    assert (obj.size, obj.etag, obj.mtime_ns) == (1700, "0cc175b9c0f1b6a831c399e269772661", 1796160823 * 10**9)


def test_a_head_without_last_modified_is_dated_the_epoch() -> None:
    obj = objectheaders.head_object("b", "m/w.bin", {k: v for k, v in OK.items() if k != "LastModified"})
    assert (obj.size, obj.mtime_ns) == (1700, 0)


@pytest.mark.parametrize("drop, lacks", [
    (("ETag", "LastModified"), "without an ETag: not an object's"),
    (("ContentLength",), "without a Content-Length: not an object's"),
    (("ETag", "ContentLength"), "without an ETag and a Content-Length"),
], ids=["no-etag", "no-length", "neither"])
def test_a_head_that_names_no_object_is_a_remote_error_in_words(drop, lacks) -> None:
    resp = {k: v for k, v in OK.items() if k not in drop} | {"ContentType": "text/html"}
    with pytest.raises(RemoteError) as info:
        objectheaders.head_object("b", "m/w.bin", resp)
    assert str(info.value).startswith('"s3://b/m/w.bin": the object store (or a proxy) answered a HEAD with '
                                      "HTTP 200, Content-Type text/html, without ")
    assert lacks in str(info.value)


@pytest.mark.parametrize("length, said", [
    (-1, '"-1"'), (2**63, f'"{2**63}"'), (99999999999999999999, '"99999999999999999999"'),
], ids=["negative", "2^63", "huge"])
def test_a_head_with_a_length_no_file_can_have_is_a_remote_error_in_words(length, said) -> None:
    """Never a size a file is shown with (stat's OverflowError, a lock of -1 bytes)."""
    with pytest.raises(RemoteError) as info:
        objectheaders.head_object("b", "m/w.bin", OK | {"ContentLength": length})
    assert (f'"s3://b/m/w.bin": the object store (or a proxy) answered a HEAD with Content-Length {said}, '
            "a size no file can have: not an object's") == str(info.value)


class _Op:
    def __init__(self, name: str) -> None:
        self.name = name


@pytest.mark.parametrize("op, sent, kept", [
    ("HeadObject", "abc", "abc"), ("GetObject", "1.5", "1.5"), ("HeadObject", "", ""),
    ("HeadObject", "1700", None), ("HeadObject", "-1", None),  # integers: botocore reads them (head_object refuses)
    ("ListObjectsV2", "abc", None),
])
def test_a_length_botocore_cannot_read_is_kept_as_sent(op, sent, kept) -> None:
    """botocore's parser would raise ValueError ("invalid literal for int()") for it."""
    headers = {"content-length": sent, "etag": "x"}
    custom: dict[str, str] = {}
    objectheaders.keep_sent_length(_Op(op), {"headers": headers}, custom)
    assert custom.get(objectheaders.SENT_LENGTH) == kept
    assert ("content-length" in headers) == (kept is None)
    if kept is not None:
        with pytest.raises(RemoteError, match=f'answered a HEAD with Content-Length "{kept}", a size no file'):
            objectheaders.head_object("b", "m/w.bin", {k: v for k, v in OK.items() if k != "ContentLength"} | custom)


MP = RemoteObject("b", "m/w.bin", 12, "0cc175b9c0f1b6a831c399e269772661-2", 0)


@pytest.mark.parametrize("resp, part", [
    ({"ContentLength": 8, "ContentRange": "bytes 0-7/12", "PartsCount": 2}, Part(8, 2)),
    ({"ContentLength": 12}, Part(12, 0)),  # a store that ignores partNumber: the whole object, no count
    ({}, Part(0, 0)),
], ids=["s3", "ignored", "nothing"])
def test_a_parts_head_is_read(resp, part) -> None:
    assert objectheaders.part_of(MP, 1, resp) == part


@pytest.mark.parametrize("resp, said", [
    ({objectheaders.SENT_LENGTH: "abc"}, 'Content-Length "abc", a size no file can have: not a part\'s'),
    ({"ContentLength": 13}, "Content-Length 13, more than the object's 12 bytes: not a part of it"),
    ({"ContentLength": 5, "ContentRange": "bytes 0-7/12"},
     'Content-Range "bytes 0-7/12" and Content-Length 5: not a part of the object of 12 bytes'),
    ({"ContentLength": 8, "ContentRange": "bytes 0-7/99"},
     'Content-Range "bytes 0-7/99" and Content-Length 8: not a part of the object of 12 bytes'),
], ids=["not-a-number", "past-the-object", "not-its-range", "another-object"])
def test_a_parts_head_of_no_part_of_the_object_is_wrong_range_in_words(resp, said) -> None:
    with pytest.raises(WrongRange) as info:
        objectheaders.part_of(MP, 1, resp)
    assert str(info.value) == f'"s3://b/m/w.bin": the object store (or a proxy) answered a HEAD of part 1 with {said}'
