"""End to end: the CRT client (`--transfer-client crt`) sends its GETs where
boto3 sends its requests, as botocore resolved it (README,
`--transfer-client`): the profile's endpoint_url, an endpoint's path, the CA
bundle botocore trusts.  Each test runs on both clients: the same setting,
the same outcome."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from support.gateway import Gateway, self_signed_cert
from support.mounting import FS, Mounter, on_both_clients
from support.proxy import S3Proxy

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
