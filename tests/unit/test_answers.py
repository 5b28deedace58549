"""answers.check: a GET's answer against what was asked (pure: the status and
headers in, accepted or the error out)."""

from __future__ import annotations

import errno

import pytest

from lazyfs import answers
from lazyfs.errors import ObjectChanged, WrongRange, errno_of
from lazyfs.namespace import RemoteObject

OBJ = RemoteObject(bucket="b", key="m/w.bin", size=1000, etag="d41d8cd98f00b204e9800998ecf8427e", mtime_ns=0)
TAG = f'"{OBJ.etag}"'


@pytest.mark.parametrize("start, end, status, content_range, etag, length", [
    (100, 200, 206, "bytes 100-199/1000", TAG, 100),
    (0, 1000, 200, None, TAG, 1000),  # the whole object, asked without a Range (boto3's)
    (0, 1000, 206, "bytes 0-999/1000", TAG, 1000),  # asked with one (the CRT's)
    (100, 200, 206, "bytes 100-199/1000", None, None),  # no ETag, no length: nothing to tell
    (100, 200, 206, "bytes 100-199/*", TAG, 100),  # a size the server does not know
    (100, 200, 206, "bytes 100-199/1000", f"W/{TAG}", 100),  # weakened by a proxy: the same version
    (100, 200, 206, "bytes 100-199/1000", OBJ.etag, 100),  # unquoted
], ids=["range", "whole-200", "whole-206", "bare", "size-unknown", "weak-etag", "unquoted-etag"])
def test_the_answer_asked_for_passes(start, end, status, content_range, etag, length) -> None:
    answers.check(OBJ, start, end, status, content_range, etag, length)


def test_an_object_stored_with_a_content_encoding_passes_at_its_length() -> None:
    """S3 serves an object put with ContentEncoding=gzip with that header and
    its stored bytes, of the listed length: those are the object's bytes."""
    answers.check(OBJ, 0, 1000, 200, None, TAG, 1000, "application/octet-stream", "gzip")
    answers.check(OBJ, 100, 200, 206, "bytes 100-199/1000", TAG, 100, None, "gzip")


@pytest.mark.parametrize("etag, content_type, encoding, said", [
    (None, "text/html", None, "answered HTTP 200, 65 bytes, Content-Type text/html, no ETag, for the object of "
                              "1000 bytes; nothing of it was written"),
    (TAG, "text/html", None, 'answered HTTP 200, 65 bytes, Content-Type text/html, ETag "d41d8cd98f00b204e9800998ecf'
                             '8427e", for the object of 1000 bytes'),
    (None, None, None, "answered HTTP 200, 65 bytes, no ETag, for the object of 1000 bytes"),
    (f"W/{TAG}", "application/octet-stream", "gzip",
     "the object store (or a proxy) answered 65 bytes with Content-Encoding: gzip for an object of 1000 bytes"),
], ids=["error-page", "error-page-with-the-etag", "bare", "re-encoded"])
def test_a_whole_object_answered_with_another_length_and_not_another_etag_is_other_bytes(
        etag, content_type, encoding, said) -> None:
    """A proxy's error page (no ETag) or a body it re-encoded (the listed
    ETag) is not another version: EIO, saying what came, not ESTALE."""
    with pytest.raises(WrongRange) as info:
        answers.check(OBJ, 0, 1000, 200, None, etag, 65, content_type, encoding)
    assert errno_of(info.value) == errno.EIO
    assert said in str(info.value), str(info.value)
    assert str(info.value).endswith("nothing of it was written")


def test_a_range_answered_with_the_whole_object_is_refused_and_said_so() -> None:
    with pytest.raises(WrongRange) as info:
        answers.check(OBJ, 100, 200, 200, None, TAG, 1000)
    assert errno_of(info.value) == errno.EIO
    assert str(info.value) == ('"s3://b/m/w.bin": the object store ignored the Range header (HTTP 200 with the whole '
                               'object, for bytes 100-199); nothing of it was written')


@pytest.mark.parametrize("content_range, length, said", [
    ("bytes 104-203/1000", 100, "answered bytes 104-203 to a request for bytes 100-199"),
    ("bytes 100-149/1000", 50, "answered bytes 100-149 to a request for bytes 100-199"),
    (None, 100, "answered HTTP 206 without a Content-Range to a request for bytes 100-199"),
    ("bytes 100-199/1000", 120, "answered 120 bytes to a request for bytes 100-199 (100 bytes)"),
    ("items 100-199/1000", 100, "answered bytes items 100-199 to a request"),
], ids=["shifted", "shorter", "no-content-range", "longer-body", "another-unit"])
def test_other_bytes_than_asked_are_refused(content_range, length, said) -> None:
    with pytest.raises(WrongRange) as info:
        answers.check(OBJ, 100, 200, 206, content_range, TAG, length)
    assert said in str(info.value) and str(info.value).endswith("nothing of it was written")


def test_an_unexpected_success_status_is_refused() -> None:
    with pytest.raises(WrongRange, match="answered a request for bytes 0-999 with HTTP 203"):
        answers.check(OBJ, 0, 1000, 203, None, TAG, 1000)


@pytest.mark.parametrize("start, end, status, content_range, etag, length, detail", [
    (100, 200, 206, "bytes 100-199/1000", '"0cc175b9c0f1b6a831c399e269772661"', 100,
     'a GET pinned to ETag "d41d8cd98f00b204e9800998ecf8427e" was answered with ETag '
     '"0cc175b9c0f1b6a831c399e269772661": the object store (or a cache in front of it) ignored If-Match'),
    (100, 200, 206, "bytes 100-199/2000", TAG, 100,
     'answered with Content-Range "bytes 100-199/2000", not of the listed 1000 bytes'),
    # another version answered in place of a range: the version is what counts
    (100, 200, 200, None, '"0cc175b9c0f1b6a831c399e269772661"', 1000, "ignored If-Match"),
], ids=["etag", "size-in-content-range", "etag-of-whole-for-a-range"])
def test_another_version_is_the_object_changed(start, end, status, content_range, etag, length, detail) -> None:
    with pytest.raises(ObjectChanged) as info:
        answers.check(OBJ, start, end, status, content_range, etag, length)
    assert errno_of(info.value) == errno.ESTALE
    assert str(info.value).startswith('"s3://b/m/w.bin" changed in the object store (')
    assert detail in info.value.detail


def test_a_head_answered_for_another_etag_is_the_object_changed() -> None:
    answers.check_etag("b", "k", OBJ.etag, TAG, "HEAD")
    answers.check_etag("b", "k", OBJ.etag, None, "HEAD")
    answers.check_etag("b", "k", "", TAG, "HEAD")  # nothing pinned: nothing to compare
    with pytest.raises(ObjectChanged, match="a HEAD pinned to ETag"):
        answers.check_etag("b", "k", OBJ.etag, '"abc"', "HEAD")


def test_a_range_re_encoded_is_refused_naming_the_encoding() -> None:
    with pytest.raises(WrongRange) as info:
        answers.check(OBJ, 100, 200, 206, "bytes 100-199/1000", TAG, 52, None, "gzip")
    assert errno_of(info.value) == errno.EIO
    assert ("the object store (or a proxy) answered 52 bytes with Content-Encoding: gzip for bytes 100-199 "
            "(100 bytes) of an object of 1000 bytes; nothing of it was written") in str(info.value)


@pytest.mark.parametrize("status, content_range, length, said", [
    (200, None, "-5", 'Content-Length "-5"'),
    (200, None, -5, 'Content-Length "-5"'),  # as botocore parses it
    (200, None, "abc", 'Content-Length "abc"'),
    (206, "bytes 100-199/1000", str(2**63), f'Content-Length "{2**63}"'),
    (206, "bytes 100-199/1000", 2**63, f'Content-Length "{2**63}"'),
    (206, f"bytes 100-199/{2**64}", 100, f'Content-Range "bytes 100-199/{2**64}"'),
    (206, "bytes 100-199/-3", 100, 'Content-Range "bytes 100-199/-3"'),
    (206, "bytes 100-199/1e3", 100, 'Content-Range "bytes 100-199/1e3"'),
], ids=["negative", "negative-int", "not-a-number", "past-2^63-1", "past-2^63-1-int", "range-past-2^63-1",
        "range-negative", "range-not-a-number"])
def test_a_length_no_file_can_have_is_refused_saying_it(status, content_range, length, said) -> None:
    """Not another version (no ESTALE, no new size taken from it): other bytes, EIO, the value said."""
    start, end = (0, 1000) if status == 200 else (100, 200)
    with pytest.raises(WrongRange) as info:
        answers.check(OBJ, start, end, status, content_range, TAG, length)
    assert errno_of(info.value) == errno.EIO
    assert f"answered a request for bytes {start}-{end - 1} with {said}, a size no file can have" in str(info.value)


@pytest.mark.parametrize("sent, length", [
    (None, None), ("1700", 1700), (" 1700 ", 1700), (0, 0), (2**63 - 1, 2**63 - 1), (str(2**63 - 1), 2**63 - 1),
    ("-1", "-1"), (-1, "-1"), ("", ""), ("١٢", "١٢"), (2**63, str(2**63)),
])
def test_possible_length(sent, length) -> None:
    assert answers.possible_length(sent) == length


@pytest.mark.parametrize("location, said", [
    ("https://user:pw@elsewhere:9000/b/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab#f",
     'a redirect to "https://elsewhere:9000/b/k"'),
    ("http://[::1]:9000/b/k?x=1", 'a redirect to "http://[::1]:9000/b/k"'),
    ("b.s3.eu-west-1.amazonaws.com", 'a redirect to "b.s3.eu-west-1.amazonaws.com"'),
    ("http://h:99999/k?sig=1", 'a redirect to "http://h:99999/k"'),  # a port no URL has: up to the query
    (None, "a redirect (no Location)"),
], ids=["credentials", "ipv6", "endpoint", "bad-port", "none"])
def test_a_redirect_says_where_it_pointed_without_credentials(location, said) -> None:
    e = answers.redirected("b", "m/w.bin", "GET", 307, "", location)
    assert errno_of(e) == errno.EIO
    assert f'"s3://b/m/w.bin": the object store answered a GET with HTTP 307, {said}; not followed' in str(e)
    assert "AKIA" not in str(e) and "pw" not in str(e) and "sig" not in str(e)


def test_a_redirect_names_s3s_code_and_the_buckets_region() -> None:
    e = answers.redirected("b", "m/", "LIST", 301, "PermanentRedirect", "b.s3.eu-west-1.amazonaws.com", "eu-west-1")
    assert ('answered a LIST with HTTP 301 PermanentRedirect, a redirect to "b.s3.eu-west-1.amazonaws.com", '
            'the bucket\'s region "eu-west-1"; not followed') in str(e)


@pytest.mark.parametrize("status, code", [(416, "InvalidRange"), (416, ""), (0, "InvalidRange")],
                         ids=["boto3", "crt", "code-only"])
def test_a_416_for_bytes_inside_the_listed_size_is_another_version(status, code) -> None:
    e = answers.unsatisfiable(OBJ, 600, 700, status, code)
    assert isinstance(e, ObjectChanged) and errno_of(e) == errno.ESTALE
    assert "bytes 600-699" in e.detail and "HTTP 416" in e.detail and "shorter now than the listed 1000" in e.detail


@pytest.mark.parametrize("status, start, end", [(412, 600, 700), (500, 600, 700), (416, 600, 1001), (416, 5, 5)],
                         ids=["412", "500", "past-the-size", "empty"])
def test_other_refusals_or_ranges_not_inside_the_size_are_not_a_416s_evidence(status, start, end) -> None:
    assert answers.unsatisfiable(OBJ, start, end, status) is None
