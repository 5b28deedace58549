"""Credentials a mount cannot have at start: which failures may pass (and
make the mount start offline), the stand-in that has them at a later use,
and how each command's start tells them apart (awssession.py, crtcreds.py,
offlinestart.py, startup.py)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import botocore.credentials
import botocore.exceptions
import pytest

from lazyfs import awssession
from lazyfs.awssession import LateCredentials, may_pass, unavailable
from lazyfs.config import MountConfig, RemoteConfig, Source
from lazyfs.crtcreds import BotocoreCredentials, CredentialsUnavailable
from lazyfs.errors import AccessDenied, CredentialsUnreachable, RemoteError, RemoteFailing, RemoteUnavailable
from lazyfs.namespace import RemoteObject
from lazyfs.offlinestart import starts_offline
from lazyfs.remote import Remote
from lazyfs.startup import FirstListing


def _client_error(status: int, code: str) -> botocore.exceptions.ClientError:
    answer: Any = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(answer, "AssumeRoleWithWebIdentity")


PASSING = {
    "a credential_process exiting non-zero": botocore.exceptions.CredentialRetrievalError(
        provider="custom-process", error_msg="token service said no"),
    "a container endpoint refusing or failing": botocore.exceptions.MetadataRetrievalError(error_msg="refused"),
    "STS unreachable": botocore.exceptions.EndpointConnectionError(endpoint_url="https://sts.amazonaws.com"),
    "STS not answering": botocore.exceptions.ReadTimeoutError(endpoint_url="https://sts.amazonaws.com"),
    "STS closing the connection": botocore.exceptions.ConnectionClosedError(endpoint_url="https://sts"),
    "STS failing": _client_error(503, "ServiceUnavailable"),
    "STS throttling": _client_error(400, "Throttling"),
    "STS unable to reach the web identity's provider": _client_error(400, "IDPCommunicationError"),
    "no answer within the bounded wait": CredentialsUnreachable("no AWS credentials within 25 s"),
}
NEVER = {
    "a key id without a secret": botocore.exceptions.PartialCredentialsError(provider="env",
                                                                             cred_var="AWS_SECRET_ACCESS_KEY"),
    "a malformed config": botocore.exceptions.InvalidConfigError(error_msg="bad"),
    "a token file missing": FileNotFoundError(2, "No such file or directory", "/nonexistent/token"),
    "STS refusing the role": _client_error(403, "AccessDenied"),
    "STS refusing the token": _client_error(400, "InvalidIdentityToken"),
    "an expired SSO session": botocore.exceptions.SSOTokenLoadError(error_msg="expired"),
    "a TLS certificate refused": botocore.exceptions.SSLError(endpoint_url="https://sts", error="bad cert"),
    "no such profile": botocore.exceptions.ProfileNotFound(profile="p"),
}


@pytest.mark.parametrize("case", list(PASSING))
def test_a_source_unreachable_failing_or_hanging_may_pass(case: str) -> None:
    assert may_pass(PASSING[case])
    assert isinstance(unavailable(PASSING[case]), CredentialsUnreachable)


@pytest.mark.parametrize("case", list(NEVER))
def test_a_configuration_that_cannot_work_does_not(case: str) -> None:
    assert not may_pass(NEVER[case])
    refusal = unavailable(NEVER[case])
    assert isinstance(refusal, AccessDenied) and not isinstance(refusal, CredentialsUnreachable)


@pytest.mark.parametrize(("error", "offline"), [
    (RemoteUnavailable("cannot reach the object store"), True),
    (CredentialsUnreachable("AWS credentials unavailable: refused"), True),
    (RemoteFailing("object store kept failing (SlowDown)"), False),  # answered: reachable, retried
    (AccessDenied("access denied"), False),
    (RemoteError("NoSuchBucket"), False),
])
def test_which_start_up_failures_start_offline(error: RemoteError, offline: bool) -> None:
    assert starts_offline(error) is offline


class Chain:
    """botocore's resolver, giving `outcomes` in turn (an exception is raised)."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.runs = 0

    def load_credentials(self) -> Any:
        self.runs += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def test_late_credentials_are_asked_for_at_each_use_until_the_chain_gives_some() -> None:
    keys = botocore.credentials.Credentials("AKIALATE", "secret", method="container-role")
    chain = Chain(PASSING["a container endpoint refusing or failing"], None, keys)
    late = LateCredentials(chain, 5.0, CredentialsUnreachable("AWS credentials unavailable: refused"))
    assert late.refresh_needed(), "a request must ask for them (crtcreds' bounded wait) before it is signed"
    assert late.method == "none yet" and late.get_deferred_property("account_id")() is None  # (no run)
    assert chain.runs == 0
    with pytest.raises(CredentialsUnreachable, match="refused"):
        late.get_frozen_credentials()
    with pytest.raises(CredentialsUnreachable, match="instance metadata"):  # none at all: IMDS did not answer
        late.get_frozen_credentials()
    assert late.get_frozen_credentials().access_key == "AKIALATE"
    assert not late.refresh_needed() and late.method == "container-role"
    assert late.get_frozen_credentials().secret_key == "secret"
    assert chain.runs == 3, "credentials had were asked for again"


def test_late_credentials_that_turn_out_misconfigured_are_refused_as_such() -> None:
    late = LateCredentials(Chain(NEVER["a key id without a secret"]), 5.0, CredentialsUnreachable("x"))
    with pytest.raises(AccessDenied) as info:
        late.get_frozen_credentials()
    assert not isinstance(info.value, CredentialsUnreachable)


OBJ = RemoteObject(bucket="b", key="m/a.bin", size=1, etag="e", mtime_ns=0)


@pytest.mark.parametrize(("raised", "passing"), [
    (CredentialsUnreachable("AWS credentials unavailable: refused"), True),
    (AccessDenied("AWS credentials unavailable: no secret"), False),
    (PASSING["STS unreachable"], True),
    (NEVER["STS refusing the role"], False),
])
def test_a_signing_without_credentials_says_whether_that_may_pass(raised: BaseException, passing: bool) -> None:
    def fetch() -> Any:
        raise raised

    creds = BotocoreCredentials(fetch, 1.0, lambda: False, may_pass)
    with pytest.raises(CredentialsUnavailable) as info:
        creds.get()
    assert info.value.may_pass is passing
    refusal = creds.refused(OBJ, "AWS_AUTH_CREDENTIALS_PROVIDER_DELEGATE_FAILURE")
    assert isinstance(refusal, CredentialsUnreachable) is passing and refusal.errno == AccessDenied.errno


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An environment with no AWS credentials, and a config file to write them in."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    config = tmp_path / "aws-config"
    config.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return config


REMOTE = RemoteConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1", connect_timeout=1.0, read_timeout=1.0)


def test_a_failing_credential_process_is_an_error_but_for_a_mount_s_start(no_credentials: Path) -> None:
    no_credentials.write_text("[default]\ncredential_process = /bin/sh -c 'echo said no >&2; exit 3'\n")
    with pytest.raises(CredentialsUnreachable, match="said no"):  # bake, lock, status, doctor: exit 1 as before
        Remote(REMOTE)
    remote = Remote(REMOTE, late_credentials=True)
    assert isinstance(remote.start_failure, CredentialsUnreachable) and "said no" in str(remote.start_failure)
    first = FirstListing(MountConfig(mountpoint=no_credentials.parent, sources=(Source("b", "m/"),), remote=REMOTE))
    with pytest.raises(CredentialsUnreachable, match="said no"):
        first.result()  # at once: not asked again, nor sent


def test_a_misconfigured_source_ends_a_mount_s_start_too(no_credentials: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAONLYTHEKEY00001")
    with pytest.raises(AccessDenied, match="AWS_SECRET_ACCESS_KEY") as info:
        Remote(REMOTE, late_credentials=True)
    assert not isinstance(info.value, CredentialsUnreachable)


def test_no_credentials_at_all_wait_for_the_instance_metadata_service_only_where_it_is_asked(
        no_credentials: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # AWS_EC2_METADATA_DISABLED=true (config.remote_config): no credentials at all, and the first request says so.
    assert Remote(dataclasses.replace(REMOTE, instance_metadata=False), late_credentials=True).start_failure is None
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "false")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9/")  # nothing listens
    failure = Remote(REMOTE, late_credentials=True).start_failure
    assert failure is not None and failure.args[0] == awssession.NONE_FOUND
    assert Remote(REMOTE).start_failure is None  # (not a mount: the first request says so)
