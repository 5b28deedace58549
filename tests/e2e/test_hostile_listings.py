"""End to end: a LIST answered wrongly (a store or a proxy in front of it) is
a failed listing, with one line naming the cause, never a shorter listing:
at start the mount comes up as for any failed first listing (LISTING FAILED,
or SAVED LISTING serving what the store holds), at a refresh the last
listing is kept, and such an answer is never saved.  An entry with a size no
file can have is skipped with a warning.  (The answers are moto's, rewritten
by the fault proxy.)"""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from support.mounting import FS, wait_until
from support.proxy import Fault

pytestmark = pytest.mark.fuse

P = "models/m"
LIST = {"list-type": "2"}
FAILED = ("listing failed", r"^\S+ \S+ ERROR lazyfs.fuse_ops: (lookup|opendir|readdir): ")
HTML = b"<html><head><title>Sign in</title></head><body><p>Welcome to the proxy</p></body></html>"


def rewrite(pattern: str, repl: str) -> Fault:
    return Fault("listbody", query=LIST, times=None, pattern=pattern, repl=repl)


def html_page() -> Fault:
    import base64

    return Fault("listbody", query=LIST, times=None, body_b64=base64.b64encode(HTML).decode(),
                 content_type="text/html")


def put(s3, bucket: str, *names: str) -> list[str]:
    keys = [f"{P}/{n}" for n in names]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    return keys


def cached_then_stopped(mount, fs: FS, store: Path, keys: list[str]) -> None:
    """A mount that read every file and saved its listing, stopped."""
    m = mount("--prefix", f"s3://{bucket_of(keys)}", "--refresh", "0", store=store)
    for k in keys:
        assert fs.read(m.file(k)) == k.encode()
        wait_until((store / k).exists, what="publication")
    wait_until(lambda: any((store / ".lazyfs" / "listings").glob("*.json")), what="the saved listing")
    m.stop()


BUCKET: list[str] = []


def bucket_of(keys: list[str]) -> str:
    return f"{BUCKET[0]}/{P}"


def saved(store: Path) -> str:
    return "".join(p.read_text() for p in (store / ".lazyfs" / "listings").glob("*.json"))


@pytest.mark.log_errors(*FAILED)
def test_truncated_without_a_token_fails_the_first_listing(mount, proxy, s3, bucket, fs: FS):
    """Before: ready, with the first page taken as the whole folder (files past it ENOENT), no line."""
    put(s3, bucket, "a.bin", "sub/c.bin")
    proxy.add(rewrite("<IsTruncated>false</IsTruncated>", "<IsTruncated>true</IsTruncated>"))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0")
    line = m.ready_line()
    assert line.startswith("lazyfs: ready LISTING FAILED: "), line
    assert (f'the object store said the listing of "s3://{bucket}/{P}/" goes on but gave no continuation token'
            in line), line
    assert fs.stat_errno(m.file(f"{P}/a.bin")) != errno.ENOENT  # asked, never assumed missing
    proxy.clear_faults()
    wait_until(lambda: "listed 2 objects" in m.log(), timeout=30, what="the retried listing")
    assert fs.listdir(m.path / P) == ["a.bin", "sub"]


@pytest.mark.log_errors(*FAILED)
def test_truncated_without_a_token_at_a_refresh_keeps_the_last_listing(mount, proxy, s3, bucket, fs: FS):
    keys = put(s3, bucket, "a.bin", "b.bin")
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "1")
    assert fs.listdir(m.path / P) == ["a.bin", "b.bin"]
    proxy.add(rewrite("<IsTruncated>false</IsTruncated>", "<IsTruncated>true</IsTruncated>"))
    wait_until(lambda: "goes on but gave no continuation token" in m.log(), timeout=30, what="a failed refresh")
    assert fs.listdir(m.path / P) == ["a.bin", "b.bin"]
    assert fs.read(m.file(keys[1])) == keys[1].encode()


@pytest.mark.log_errors(*FAILED)
def test_a_continuation_token_given_again_fails_the_listing_and_nothing_hangs(mount, proxy, s3, bucket, fs: FS):
    """Before: the same page asked for again and again (672 LISTs a minute), ls, stat and cat hanging."""
    keys = put(s3, bucket, "a.bin", "b.bin", "sub/c.bin")
    token = s3.list_objects_v2(Bucket=bucket, Prefix=f"{P}/", MaxKeys=1)["NextContinuationToken"]
    proxy.add(rewrite("<IsTruncated>false</IsTruncated>",
                      f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>"))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0")
    wait_until(lambda: "gave the same continuation token again" in m.log(), timeout=30, what="the failed listing")
    assert f'while listing "s3://{bucket}/{P}/": the listing would never end' in m.log()
    lists = proxy.count("LIST")
    time.sleep(2)
    assert proxy.count("LIST") - lists < 20, "a listing that ends, tried again with backoff"
    # Everything answers (under the FS timeout), as README says of a failed first listing: a lookup asks the
    # store for its own name (which says "truncated" here too: EIO, never ENOENT); ls of a folder not listed: EIO.
    assert fs.stat_errno(m.file(keys[2])) == errno.EIO
    with pytest.raises(OSError) as e:
        fs.listdir(m.path / P)
    assert e.value.errno == errno.EIO


@pytest.mark.log_errors(*FAILED)
def test_an_html_page_at_a_start_is_a_failed_listing_and_the_saved_one_serves(mount, proxy, s3, bucket, fs: FS,
                                                                              tmp_path: Path):
    """Before: the HTML page listed nothing: every file ENOENT, only a "holds no objects" warning."""
    BUCKET[:] = [bucket]
    keys = put(s3, bucket, "a.bin", "sub/c.bin")
    store = tmp_path / "store"
    cached_then_stopped(mount, fs, store, keys)
    proxy.add(html_page())
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", store=store)
    line = m.ready_line()
    assert line.startswith("lazyfs: ready SAVED LISTING: "), line
    assert (f'the object store\'s answer to LIST of "s3://{bucket}/{P}/" was not a listing: HTTP 200'
            in line and "Content-Type text/html" in line), line
    assert fs.listdir(m.path / P) == ["a.bin", "sub"]
    for k in keys:
        assert fs.read(m.file(k)) == k.encode()
    assert "holds no objects" not in m.log()


@pytest.mark.log_errors(*FAILED)
@pytest.mark.parametrize("answer", ["html", "empty"])
def test_a_200_that_is_no_listing_at_a_refresh_is_neither_applied_nor_saved(mount, proxy, s3, bucket, fs: FS,
                                                                           tmp_path: Path, answer: str):
    """Before: the mount emptied, and the empty listing was saved: a later offline start had nothing to serve."""
    keys = put(s3, bucket, "a.bin", "b.bin")
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "1", store=store)
    assert fs.read(m.file(keys[0])) == keys[0].encode()
    wait_until(lambda: "b.bin" in saved(store), what="the saved listing")
    proxy.add(html_page() if answer == "html" else rewrite(r"(?s)^.*$", ""))
    wait_until(lambda: m.log().count("was not a listing: HTTP 200") >= 2, timeout=30, what="two failed refreshes")
    assert fs.listdir(m.path / P) == ["a.bin", "b.bin"]
    assert "a.bin" in saved(store) and "b.bin" in saved(store)
    assert "holds no objects" not in m.log()


@pytest.mark.log_errors(*FAILED)
def test_a_size_that_is_no_number_at_a_start_is_a_failed_listing(mount, proxy, s3, bucket, fs: FS,
                                                                 tmp_path: Path):
    """Before: `lazyfs: error: ...: unexpected ValueError: invalid literal for int()`, exit 1, every file cached."""
    BUCKET[:] = [bucket]
    keys = put(s3, bucket, "a.bin", "b.bin")
    store = tmp_path / "store"
    cached_then_stopped(mount, fs, store, keys)
    proxy.add(rewrite(r"(?s)(<Key>models/m/b\.bin</Key>.*?<Size>)\d+", r"\g<1>12x"))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0", store=store)
    line = m.ready_line()
    assert line.startswith("lazyfs: ready SAVED LISTING: "), line
    assert "listing could not be read: a Size that is not a number" in line or \
        "could not be read: a Size that is not a number" in line, line
    assert "ValueError" not in m.log()
    for k in keys:
        assert fs.read(m.file(k)) == k.encode()


@pytest.mark.log_errors(*FAILED)
def test_malformed_xml_is_said_to_be_so_not_a_500(mount, proxy, s3, bucket, fs: FS):
    """Before: `object store kept failing (500: Internal Server Error)` for a 200 with a broken body."""
    put(s3, bucket, "a.bin")
    proxy.add(rewrite("</ListBucketResult>", ""))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0")
    line = m.ready_line()
    assert line.startswith("lazyfs: ready LISTING FAILED: "), line
    assert "HTTP 200 with a body that is not S3's XML" in line and "500" not in line, line


@pytest.mark.parametrize("size", ["9223372036854775808", "-5"])
def test_a_size_no_file_can_have_is_skipped_with_a_warning(mount, proxy, s3, bucket, fs: FS, size: str):
    """Before: OverflowError tracebacks in readdir and lookup, `ls` EIO for the folder; -5: EIO, no line."""
    keys = put(s3, bucket, "a.bin", "big.bin")
    proxy.add(rewrite(r"(?s)(<Key>models/m/big\.bin</Key>.*?<Size>)\d+", rf"\g<1>{size}"))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "0")
    assert fs.listdir(m.path / P) == ["a.bin"]
    assert fs.stat_errno(m.file(keys[1])) == errno.ENOENT
    assert fs.read(m.file(keys[0])) == keys[0].encode()
    assert f'skipping object "{keys[1]}": its listed size {size} is not possible' in m.log(), m.log()
