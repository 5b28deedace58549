"""End to end: a proxy in front of the store answers in its own words: an
error page as `200 text/html` (no ETag, no Last-Modified), or the object's
body re-encoded (`Content-Encoding: gzip`, with the listed ETag).  Neither is
another version of the object: a reader gets EIO and one line saying what
came, never ESTALE and "changed in the object store", on both transfer
clients; a HEAD so answered is refused in words, never a traceback.  An
object stored with Content-Encoding: gzip is served as its stored bytes."""

from __future__ import annotations

import base64
import errno
import gzip
import os
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, on_both_clients, wait_until
from support.proxy import Fault
from support.s3server import s3_client

pytestmark = [pytest.mark.fuse]

P = "models/m"
KEY = f"{P}/w.bin"
PAGE = b"<html><body><h1>Proxy error</h1>Service unavailable</body></html>"


def read(path: Path) -> bytes | int:
    """The file's bytes, or the errno its read failed with."""
    try:
        return path.read_bytes()
    except OSError as e:
        return e.errno or -1


def failed_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if "download of" in ln and "failed" in ln]


@on_both_clients
@pytest.mark.log_errors("download of .* failed: .*the object store")
@pytest.mark.parametrize("headers, body, said", [
    ({"Content-Type": "text/html"}, PAGE, "HTTP 200, 65 bytes, Content-Type text/html, no ETag"),
    ({"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"}, None,
     "answered {zipped} bytes with Content-Encoding: gzip for an object of 1700 bytes"),
], ids=["error-page", "re-encoded"])
def test_a_proxys_own_answer_to_a_get_is_eio_saying_what_came(mount, proxy, moto, bucket, fs: FS, tmp_path: Path,
                                                               transfer_client: str, headers, body, said):
    data = os.urandom(850) * 2  # 1700 bytes that compress
    s3_client(moto.endpoint, checksums=False).put_object(Bucket=bucket, Key=KEY, Body=data)
    etag = s3_client(moto.endpoint).head_object(Bucket=bucket, Key=KEY)["ETag"]
    if body is None:  # the listed ETag, weakened as nginx does when it compresses
        body, headers = gzip.compress(data), headers | {"ETag": f"W/{etag}"}
    proxy.add(Fault("answer", key=KEY, times=None, status=200, headers=headers,
                    body_b64=base64.b64encode(body).decode()))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--no-etag-check", "--retries", "1", store=tmp_path / "store")
    assert fs.run(read, m.file(KEY), timeout=60) == errno.EIO
    assert any(r["fault"] == "answer" for r in proxy.requests("GET", KEY)), "the fault never fired"
    lines = failed_lines(m.log())
    assert lines and all("changed in the object store" not in ln for ln in lines), lines
    assert "changed in the object store" not in m.log()
    assert "Traceback" not in m.log()
    # The same facts from both clients (the CRT refuses such an answer to its ranged GET without showing it, and
    # said "ignored the Range header": what came is seen by asking again, cancelled at the headers).
    assert any(said.format(zipped=len(body)) in ln and "nothing of it was written" in ln for ln in lines), lines
    proxy.clear_faults()
    assert fs.run(read, m.file(KEY), timeout=60) == data
    wait_until((m.store / KEY).exists, what="publication")
    assert (m.store / KEY).read_bytes() == data


@pytest.mark.parametrize("transfer_client", ["crt"], indirect=True)
@pytest.mark.log_errors("download of .* failed: .*the object store")
def test_a_range_re_encoded_is_refused_though_the_crt_reports_the_length_asked(mount, proxy, moto, bucket, fs: FS,
                                                                               tmp_path: Path):
    """A 206 of the range asked, its Content-Range right, the body gzipped:
    the CRT reports the part's length as asked (1700), not the 52 bytes
    sent, and handed them over as the file's first bytes (then asked again
    from byte 52, four times).  Refused at the part, not retried."""
    data = os.urandom(850) * 2
    s3_client(moto.endpoint, checksums=False).put_object(Bucket=bucket, Key=KEY, Body=data)
    etag = s3_client(moto.endpoint).head_object(Bucket=bucket, Key=KEY)["ETag"]
    body = gzip.compress(data)
    proxy.add(Fault("answer", key=KEY, times=None, status=206, body_b64=base64.b64encode(body).decode(),
                    headers={"ETag": etag, "Content-Range": "bytes 0-1699/1700", "Content-Encoding": "gzip"}))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--no-etag-check", store=tmp_path / "store")
    assert fs.run(read, m.file(KEY), timeout=60) == errno.EIO
    [line] = failed_lines(m.log())
    assert (f"answered {len(body)} bytes with Content-Encoding: gzip for bytes 0-1699 (1700 bytes)" in line
            and "nothing of it was written" in line), line
    assert sum(r["fault"] == "answer" for r in proxy.requests("GET", KEY)) == 1, "not asked again"
    proxy.clear_faults()
    assert fs.run(read, m.file(KEY), timeout=60) == data


@on_both_clients
def test_an_object_stored_with_content_encoding_gzip_reads_as_its_stored_bytes(mount, moto, bucket, fs: FS,
                                                                                tmp_path: Path):
    """S3 serves it with `Content-Encoding: gzip` at its listed length: those
    bytes are the object's, written as they are, never decoded."""
    stored = gzip.compress(os.urandom(100_000) * 3)  # several parts of 64 KiB (the CRT's parts)
    s3_client(moto.endpoint).put_object(Bucket=bucket, Key=KEY, Body=stored, ContentEncoding="gzip",
                                        ContentType="application/octet-stream")
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", store=tmp_path / "store")
    assert fs.run(read, m.file(KEY), timeout=60) == stored
    wait_until((m.store / KEY).exists, what="publication")
    assert (m.store / KEY).read_bytes() == stored


def test_a_head_answered_with_a_proxys_page_is_one_line_not_a_traceback(proxy, moto, bucket, tmp_path: Path):
    """`lazyfs lock` HEADs each object: answered 200 text/html with no ETag
    and no Last-Modified, it names no object."""
    s3_client(moto.endpoint).put_object(Bucket=bucket, Key=KEY, Body=b"x" * 1700)
    proxy.add(Fault("answer", method="HEAD", key=KEY, times=None, status=200,
                    headers={"Content-Type": "text/html", "Content-Length": str(len(PAGE))}))
    res = lazyfs_cli(["lock", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                      "-o", str(tmp_path / "m.lock")], timeout=60)
    assert any(r["fault"] == "answer" for r in proxy.requests("HEAD", KEY)), "the fault never fired"
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "KeyError" not in res.stderr, res.stderr
    assert ("the object store (or a proxy) answered a HEAD with HTTP 200, Content-Type text/html, without an ETag: "
            "not an object's") in res.stderr, res.stderr


@pytest.mark.log_errors("download of .* failed|changed in the object store|contradicts itself")
def test_a_head_with_the_listed_etag_and_another_size_is_not_a_new_version(mount, proxy, moto, bucket, fs: FS,
                                                                           tmp_path: Path):
    """GETs answered 412 (as after a replace), and the HEAD lazyfs then sends
    answers the listed ETag with 1000 bytes more: an answer that contradicts
    itself.  The listed version stays (its size shown, its bytes read once
    the store answers right again), with one line saying so."""
    data = os.urandom(1700)
    s3_client(moto.endpoint).put_object(Bucket=bucket, Key=KEY, Body=data)
    etag = s3_client(moto.endpoint).head_object(Bucket=bucket, Key=KEY)["ETag"]
    m = mount("--prefix", f"s3://{bucket}/{P}", "--refresh", "300", store=tmp_path / "store")
    assert fs.run(os.stat, m.file(KEY)).st_size == 1700
    proxy.add(Fault("status", key=KEY, times=None, status=412, code="PreconditionFailed"))
    proxy.add(Fault("answer", method="HEAD", key=KEY, times=None, status=200,
                    headers={"ETag": etag, "Content-Length": "2700", "Last-Modified": "Tue, 01 Dec 2026 10:00:00 GMT",
                             "Content-Type": "application/octet-stream"}))
    assert fs.run(read, m.file(KEY), timeout=60) == errno.ESTALE  # (the store said the version is gone)
    wait_until(lambda: any(r["fault"] == "answer" for r in proxy.requests("HEAD", KEY)), what="the HEAD")
    wait_until(lambda: "contradicts itself" in m.log() or "new version in the object store" in m.log(),
               what="the HEAD's answer taken")
    assert fs.run(os.stat, m.file(KEY)).st_size == 1700
    assert "new version in the object store" not in m.log()
    [line] = [ln for ln in m.log().splitlines() if "contradicts itself" in ln][:1]
    assert "the listed ETag" in line and "but 2700 bytes, not the listed 1700" in line, line
    proxy.clear_faults()
    assert fs.run(read, m.file(KEY), timeout=60) == data


@pytest.mark.parametrize("length", ["-1", "abc", "99999999999999999999"], ids=["negative", "not-a-number", "huge"])
def test_a_head_with_a_length_no_file_can_have_is_one_line_not_a_lock(proxy, moto, bucket, tmp_path: Path,
                                                                       length: str):
    """The object's own ETag, a Content-Length no file has: `lazyfs lock`
    wrote a lock of a -1 byte (or 10^20 byte) file, or said botocore's
    "unexpected ValueError: invalid literal for int()"."""
    s3_client(moto.endpoint).put_object(Bucket=bucket, Key=KEY, Body=b"x" * 1700)
    etag = s3_client(moto.endpoint).head_object(Bucket=bucket, Key=KEY)["ETag"]
    proxy.add(Fault("answer", method="HEAD", key=KEY, times=None, status=200,
                    headers={"ETag": etag, "Content-Length": length, "Last-Modified": "Tue, 01 Dec 2026 10:00:00 GMT"}))
    res = lazyfs_cli(["lock", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                      "-o", str(tmp_path / "m.lock")], timeout=60)
    assert any(r["fault"] == "answer" for r in proxy.requests("HEAD", KEY)), "the fault never fired"
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "ValueError" not in res.stderr, res.stderr
    assert (f'answered a HEAD with Content-Length "{length}", a size no file can have: not an object\'s'
            in res.stderr), res.stderr
    assert not (tmp_path / "m.lock").exists()


@on_both_clients
@pytest.mark.log_errors("download of .* failed: .*(a size no file can have|cannot read|not valid HTTP)")
@pytest.mark.parametrize("status, headers", [
    (200, {"Content-Length": "-5"}),
    (200, {"Content-Length": "abc"}),
    (206, {"Content-Range": "bytes 0-1699/99999999999999999999"}),
], ids=["negative", "not-a-number", "range-huge"])
def test_a_get_answered_with_a_length_no_file_can_have_is_eio_saying_it(mount, proxy, moto, bucket, fs: FS,
                                                                       tmp_path: Path, transfer_client: str,
                                                                       status: int, headers):
    """The object's bytes and ETag, a length header no file has: EIO and
    the value said, never ESTALE ("changed": a new size taken from it)."""
    data = os.urandom(1700)
    s3_client(moto.endpoint, checksums=False).put_object(Bucket=bucket, Key=KEY, Body=data)
    etag = s3_client(moto.endpoint).head_object(Bucket=bucket, Key=KEY)["ETag"]
    proxy.add(Fault("answer", key=KEY, times=None, status=status, headers={"ETag": etag} | headers,
                    body_b64=base64.b64encode(data).decode()))
    m = mount("--prefix", f"s3://{bucket}/{P}", "--no-etag-check", "--retries", "1", store=tmp_path / "store")
    assert fs.run(read, m.file(KEY), timeout=60) == errno.EIO
    assert any(r["fault"] == "answer" for r in proxy.requests("GET", KEY)), "the fault never fired"
    name, value = next(iter(headers.items()))
    lines = failed_lines(m.log())
    if transfer_client == "boto3":
        said = f'with {name} "{value}", a size no file can have'
    else:  # the CRT refuses such headers itself and shows none of them: its reason in words
        said = "Content-Range the CRT client cannot read" if name == "Content-Range" else "not valid HTTP"
    assert any(said in ln for ln in lines), lines
    assert "changed in the object store" not in m.log() and "Traceback" not in m.log()
    proxy.clear_faults()
    assert fs.run(read, m.file(KEY), timeout=60) == data


def test_a_parts_head_answered_with_another_size_than_its_range_is_one_line_naming_it(proxy, moto, bucket,
                                                                                      tmp_path: Path):
    """`lazyfs lock` asks each part's size of a multipart object (a HEAD with
    partNumber).  A proxy's answer whose Content-Length is not the span of its
    own Content-Range was taken as the part's size: the lock then said its
    part sizes were unknown (or, assumed from it, a later check blamed the
    bytes).  Refused, with a line naming what came."""
    s3 = s3_client(moto.endpoint)
    upload = s3.create_multipart_upload(Bucket=bucket, Key=KEY)["UploadId"]
    part = 5 * 1024 * 1024  # moto's least part size
    done = [{"ETag": s3.upload_part(Bucket=bucket, Key=KEY, UploadId=upload, PartNumber=n,
                                    Body=os.urandom(part))["ETag"], "PartNumber": n} for n in (1, 2)]
    s3.complete_multipart_upload(Bucket=bucket, Key=KEY, UploadId=upload, MultipartUpload={"Parts": done})
    head = s3.head_object(Bucket=bucket, Key=KEY)
    proxy.add(Fault("answer", method="HEAD", key=KEY, times=None, status=206, query={"partNumber": "1"},
                    headers={"ETag": head["ETag"], "Content-Length": "5000000",
                             "Content-Range": f"bytes 0-{part - 1}/{2 * part}", "x-amz-mp-parts-count": "2",
                             "Last-Modified": "Tue, 01 Dec 2026 10:00:00 GMT",
                             "Content-Type": "application/octet-stream"}))
    res = lazyfs_cli(["lock", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                      "-o", str(tmp_path / "m.lock")], timeout=60)
    assert any(r["fault"] == "answer" for r in proxy.requests("HEAD", KEY)), "the fault never fired"
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert (f'"s3://{bucket}/{KEY}": the object store (or a proxy) answered a HEAD of part 1 with Content-Range '
            f'"bytes 0-{part - 1}/{2 * part}" and Content-Length 5000000: not a part of the object of {2 * part} '
            "bytes") in res.stderr, res.stderr
