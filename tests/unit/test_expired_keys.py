"""A credential source that answers keys that expired already (a container
endpoint whose clock or rotation is broken): botocore refreshes them, finds
them still expired and raises a bare RuntimeError, which lazyfs said as an
internal error.  awssession._unexpired makes it a CredentialRetrievalError,
a source failing like any other: at start and at a refresh mid-run."""

from __future__ import annotations

import datetime
from typing import Any

import botocore.credentials
import botocore.exceptions
import pytest

from lazyfs import awssession


def _at(seconds: float) -> str:
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class Source:
    def __init__(self, valid_s: float) -> None:
        self.valid_s = valid_s
        self.asked = 0

    def __call__(self) -> dict[str, Any]:
        self.asked += 1
        return {"access_key": "ASIAEXPIREDKEYS00001", "secret_key": "s", "token": "t",
                "expiry_time": _at(self.valid_s)}


def _creds(source: Source) -> botocore.credentials.RefreshableCredentials:
    return botocore.credentials.RefreshableCredentials.create_from_metadata(source(), source, "container-role")


def test_keys_expired_at_start_are_a_source_failing_at_once() -> None:
    source = Source(-3600)
    with pytest.raises(botocore.exceptions.CredentialRetrievalError) as raised:
        awssession._unexpired(_creds(source))
    assert "container-role" in str(raised.value) and "expired at" in str(raised.value)
    assert awssession.may_pass(raised.value)
    assert "AWS credentials unavailable" in str(awssession.unavailable(raised.value))


def test_keys_expired_at_a_refresh_mid_run_are_a_source_failing_not_a_runtime_error() -> None:
    source = Source(3600)
    creds = awssession._unexpired(_creds(source))
    assert creds.get_frozen_credentials().access_key == "ASIAEXPIREDKEYS00001" and source.asked == 1
    source.valid_s = -60
    creds._expiry_time = datetime.datetime.now(datetime.timezone.utc)  # (due now: a mandatory refresh)
    with pytest.raises(botocore.exceptions.CredentialRetrievalError):
        creds.get_frozen_credentials()


def test_fresh_keys_and_static_ones_pass_untouched() -> None:
    source = Source(3600)
    creds = awssession._unexpired(_creds(source))
    assert awssession._unexpired(creds) is creds and source.asked == 1  # (wrapped once; nothing asked again)
    static = botocore.credentials.Credentials("AKIASTATICKEYS000001", "s")
    assert awssession._unexpired(static) is static and awssession._unexpired(None) is None
