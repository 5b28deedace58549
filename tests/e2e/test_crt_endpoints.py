"""End to end: the CRT client (`--transfer-client crt`) sends its GETs where
boto3 sends its requests, as botocore resolved it (README,
`--transfer-client`): the profile's endpoint_url, an endpoint's path, the CA
bundle botocore trusts; and a refusal of the credentials is EACCES from
either client.  Each test runs on both clients: the same setting, the same
outcome."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterator

import pytest

from support.gateway import Gateway, self_signed_cert
from support.mounting import FS, Mounter, on_both_clients
from support.proxy import Fault, S3Proxy

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/m"


@pytest.fixture
def gateway(proxy: S3Proxy) -> Iterator[Gateway]:
    with Gateway(proxy.endpoint, "/gw") as gw:
        yield gw


def _upload(s3, bucket: str, name: str) -> tuple[str, bytes]:
    key = f"{P}/{name}"
    data = os.urandom(3 * 1024 * 1024 + 17)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    return key, data


def _profile(tmp_path: Path, **settings: str) -> Path:
    """An AWS config file whose default profile has `settings`."""
    config = tmp_path / "aws-config"
    config.write_text("[default]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    return config


def test_the_profiles_endpoint_url_and_its_path_are_where_the_gets_go(mount: Mounter, gateway: Gateway, s3,
                                                                       bucket: str, fs: FS, tmp_path: Path,
                                                                       transfer_client: str):
    """`endpoint_url` in the profile (~/.aws/config), with a path: boto3
    listed through it, the CRT sent its GETs to AWS itself (EIO); and an
    endpoint's path (a gateway's /gw) was dropped from the CRT's GETs."""
    key, data = _upload(s3, bucket, "w.bin")
    env = mount.env(AWS_CONFIG_FILE=str(_profile(tmp_path, endpoint_url=gateway.endpoint)))
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store", endpoint="", env=env)
    assert fs.read(m.file(key), timeout=60) == data
    gets = gateway.gets(key)
    assert gets and all(p.startswith(f"/gw/{bucket}/{key}") for p in gets), gets


def test_an_endpoint_flags_path_is_kept(mount: Mounter, gateway: Gateway, s3, bucket: str, fs: FS,
                                        tmp_path: Path, transfer_client: str):
    key, data = _upload(s3, bucket, "p.bin")
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store", endpoint=gateway.endpoint)
    assert fs.read(m.file(key), timeout=60) == data
    gets = gateway.gets(key)
    assert gets and all(p.startswith(f"/gw/{bucket}/{key}") for p in gets), gets


def test_an_https_endpoint_signed_by_a_private_ca_is_trusted_as_botocore_trusts_it(
        mount: Mounter, proxy: S3Proxy, s3, bucket: str, fs: FS, tmp_path: Path, transfer_client: str):
    """AWS_CA_BUNDLE names the CA of an HTTPS endpoint: boto3 trusted it, the
    CRT failed each TLS negotiation (EIO after a minute)."""
    key, data = _upload(s3, bucket, "t.bin")
    cert, tls_key = self_signed_cert(tmp_path)
    with Gateway(proxy.endpoint, "/gw", tls=(cert, tls_key)) as gw:
        env = mount.env(AWS_CA_BUNDLE=str(cert))
        m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store", endpoint=gw.endpoint, env=env)
        assert fs.read(m.file(key), timeout=60) == data
        assert gw.gets(key)
        m.stop()


@pytest.mark.parametrize("code", ["ExpiredToken", "InvalidToken", "InvalidAccessKeyId"])
def test_an_expired_or_unknown_token_is_eacces_with_one_warning(mount: Mounter, proxy: S3Proxy, s3,
                                                                bucket: str, fs: FS, tmp_path: Path,
                                                                transfer_client: str, code: str):
    """S3 answers 400 ExpiredToken (or another refusal of the credentials):
    boto3's path said EACCES and one WARNING, the CRT's EIO and an ERROR
    (`object store kept failing (ExpiredToken: HTTP 400)`)."""
    key, data = _upload(s3, bucket, "x.bin")
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store")
    fs.listdir(m.path / P)
    proxy.add(Fault("status", key=key, status=400, code=code, times=None))
    with pytest.raises(OSError) as info:
        fs.read(m.file(key), timeout=60)
    assert info.value.errno == errno.EACCES
    said = [ln for ln in m.log().splitlines() if (" ERROR " in ln or " WARNING " in ln) and key in ln]
    assert said and all(" WARNING " in ln and code in ln for ln in said), said
    assert "kept failing" not in m.log()
    proxy.clear_faults()
    assert fs.read(m.file(key), timeout=60) == data, "the next open did not try again"


@pytest.mark.parametrize("how", ["endpoint_url", "services", "addressing_style"])
def test_a_profiles_endpoint_by_host_name_is_addressed_path_style(mount: Mounter, proxy: S3Proxy, s3, bucket: str,
                                                                  fs: FS, tmp_path: Path, transfer_client: str,
                                                                  how: str):
    """The profile's endpoint is a host name (`http://localhost:PORT`), in
    its endpoint_url or its `services` section, or with the profile's own
    `addressing_style = path`: lazyfs asked botocore for "auto" (the path
    style came only with an endpoint of the flag or the environment), and
    the CRT sent its GETs to `bucket.localhost` (EIO: AWS_IO_DNS_INVALID_NAME)."""
    key, data = _upload(s3, bucket, "h.bin")
    url = proxy.endpoint.replace("127.0.0.1", "localhost")
    profile = {"endpoint_url": f"[default]\nendpoint_url = {url}\n",
               "services": f"[default]\nservices = here\n[services here]\ns3 =\n  endpoint_url = {url}\n",
               "addressing_style": f"[default]\nendpoint_url = {url}\ns3 =\n  addressing_style = path\n"}[how]
    config = tmp_path / "aws-config"
    config.write_text(profile)
    m = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store", endpoint="",
              env=mount.env(AWS_CONFIG_FILE=str(config)))
    assert fs.read(m.file(key), timeout=60) == data
    assert proxy.count("GET", key), "the file's bytes did not come through the profile's endpoint"


@pytest.mark.log_errors('download of .* failed: ')
def test_an_object_store_gone_is_said_with_the_host_tried_and_what_failed(mount: Mounter, proxy: S3Proxy, s3,
                                                                          bucket: str, fs: FS, tmp_path: Path,
                                                                          transfer_client: str):
    """The object store stops listening after the listing: boto3 said `cannot
    reach the object store at http://127.0.0.1:PORT`, the CRT `transfer broke
    off before any of bytes 0-1048575 was written (AWS_IO_SOCKET_CONNECTION_REFUSED)`,
    which names neither the host nor, in words, what failed."""
    key, _ = _upload(s3, bucket, "gone.bin")
    m = mount("--prefix", f"s3://{bucket}/{P}", "--retries", "1", store=tmp_path / "store")
    fs.listdir(m.path / P)
    endpoint = proxy.endpoint
    proxy.stop()
    with pytest.raises(OSError) as info:
        fs.read(m.file(key), timeout=60)
    assert info.value.errno == errno.EIO
    failed = [ln for ln in m.log().splitlines() if "download of" in ln and "failed" in ln]
    assert failed and all(f"cannot reach the object store at {endpoint}" in ln for ln in failed), failed
    if transfer_client == "crt":
        assert all("(connection refused: AWS_IO_SOCKET_CONNECTION_REFUSED)" in ln for ln in failed), failed
