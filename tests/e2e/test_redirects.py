"""End to end: an object store (or a proxy) answering a GET, a HEAD or a
LIST with a redirect (a moved or wrong-region bucket, a proxy pointing
elsewhere).  lazyfs never follows one: its requests carry the user's
credentials and go only to the endpoint configured.  The failure says the
status and where it pointed (its Location, or S3's <Endpoint>), without
the query string a presigned URL keeps its credentials in; a redirect is
not retried as an outage is."""

from __future__ import annotations

import base64
import errno
import os
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, on_both_clients
from support.proxy import Fault
from support.s3server import s3_client

pytestmark = [pytest.mark.fuse]

P = "models/m"
KEY = f"{P}/w.bin"
ELSEWHERE = "http://elsewhere.example:9000/b/models/m/w.bin"
SIGNED = f"{ELSEWHERE}?X-Amz-Credential=AKIASECRETKEYID%2F20261207&X-Amz-Signature=feedfacecafe"
MOVED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>PermanentRedirect</Code><Message>The bucket you are '
         b"attempting to access must be addressed using the specified endpoint.</Message>"
         b"<Endpoint>b.s3.eu-west-1.amazonaws.com</Endpoint></Error>")


def read(path: Path) -> bytes | int:
    """The file's bytes, or the errno its read failed with."""
    try:
        return path.read_bytes()
    except OSError as e:
        return e.errno or -1


@on_both_clients
@pytest.mark.log_errors("download of .* failed: .*a redirect")
@pytest.mark.parametrize("status", [307, 302, 308])
def test_a_get_redirected_fails_saying_where_it_pointed(mount, proxy, s3, bucket, fs: FS, tmp_path: Path,
                                                        transfer_client: str, status: int):
    data = os.urandom(1700)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store")
    fs.listdir(m.path / P)
    proxy.add(Fault("answer", key=KEY, times=None, status=status, headers={"Location": SIGNED}))
    assert fs.run(read, m.file(KEY), timeout=60) == errno.EIO
    gets = [r for r in proxy.requests("GET", KEY) if r["fault"] == "answer"]
    assert gets, "the fault never fired"
    # (botocore asks once more after a redirect, in the region it finds: its own, for AWS; never --retries times)
    assert len(gets) <= 2, [r["range"] for r in gets]
    lines = [ln for ln in m.log().splitlines() if "download of" in ln and "failed" in ln]
    assert any(f'answered a GET with HTTP {status}, a redirect to "{ELSEWHERE}"; not followed' in ln
               for ln in lines), lines
    assert "SECRET" not in m.log() and "feedfacecafe" not in m.log()
    assert "Traceback" not in m.log()
    proxy.clear_faults()
    assert fs.run(read, m.file(KEY), timeout=60) == data


@pytest.mark.parametrize("method, headers, body, said", [
    ("HEAD", {"Location": SIGNED}, b"", f'answered a HEAD with HTTP 301, a redirect to "{ELSEWHERE}"'),
    ("LIST", {"Content-Type": "application/xml", "x-amz-bucket-region": "eu-west-1"}, MOVED,
     'answered a LIST with HTTP 301 PermanentRedirect, a redirect to "b.s3.eu-west-1.amazonaws.com", '
     'the bucket\'s region "eu-west-1"'),
], ids=["head", "list"])
def test_a_head_or_list_redirected_is_one_line_naming_where(proxy, moto, bucket, tmp_path: Path, method, headers,
                                                           body, said):
    """`lazyfs lock` lists the folder, then HEADs each object."""
    s3_client(moto.endpoint).put_object(Bucket=bucket, Key=KEY, Body=b"x" * 1700)
    if method == "HEAD":
        fault = Fault("answer", method="HEAD", key=KEY, times=None, status=301, headers=headers)
    else:
        fault = Fault("answer", query={"list-type": "2"}, times=None, status=301, headers=headers,
                      body_b64=base64.b64encode(body).decode())
    proxy.add(fault)
    res = lazyfs_cli(["lock", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                      "-o", str(tmp_path / "m.lock")], timeout=60)
    assert any(r["fault"] == "answer" for r in proxy.requests(method)), "the fault never fired"
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "SECRET" not in res.stderr, res.stderr
    assert said in res.stderr and "not followed" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
