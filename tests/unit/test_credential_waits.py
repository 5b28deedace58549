"""What a wait for credentials that gives up says (crtcreds.BotocoreCredentials,
both transfer clients): the cause botocore last gave (a mount's start's, or a
refresh's the wait gave up on), and else the source it waits for.  Before, it
said only that the wait ran out, and blamed "a credential_process or SSO
helper" whatever the source (a container endpoint retrying, say)."""

from __future__ import annotations

import threading
from typing import Any

import botocore.exceptions
import pytest

from lazyfs import awssession
from lazyfs.crtcreds import BotocoreCredentials, CredentialsUnavailable
from lazyfs.errors import CredentialsUnreachable

CAUSE = ("AWS credentials unavailable: Error when retrieving credentials from container-role: Error retrieving "
         "metadata: Received non 200 response 500 from container metadata")


class Slow:
    """botocore's chain answering after the test lets it: with an error, or keys."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.raised: BaseException | None = None

    def __call__(self) -> Any:
        assert self.go.wait(10)
        if self.raised is not None:
            raise self.raised
        return ("AKIA", "s", None)


def refused(creds: BotocoreCredentials) -> str:
    with pytest.raises(CredentialsUnavailable) as info:
        creds.get()
    assert info.value.may_pass
    return str(info.value)


def test_a_wait_that_gives_up_says_the_start_s_cause_not_the_wait() -> None:
    slow = Slow()
    creds = BotocoreCredentials(slow, 0.05, lambda: True, awssession.may_pass, lambda: "x", CAUSE)
    assert refused(creds) == f"{CAUSE} (asked again: no answer within 0.05 s)"
    slow.go.set()


def test_a_refresh_the_wait_gave_up_on_gives_the_next_wait_its_cause() -> None:
    slow = Slow()
    creds = BotocoreCredentials(slow, 0.05, lambda: True, awssession.may_pass,
                                lambda: "the container credentials endpoint")
    first = refused(creds)
    assert "the container credentials endpoint does not answer?" in first and "credential_process" not in first
    slow.raised = awssession.unavailable(botocore.exceptions.MetadataRetrievalError(
        error_msg="Received non 200 response 500 from container metadata"))
    assert isinstance(slow.raised, CredentialsUnreachable)
    slow.go.set()
    while creds.waiting():
        threading.Event().wait(0.01)
    slow.go.clear()
    slow.raised = None
    second = refused(creds)  # asked again, slow again
    assert second.startswith("AWS credentials unavailable: Error retrieving metadata: Received non 200 response 500")
    assert second.endswith("(asked again: no answer within 0.05 s)")
    slow.go.set()
    while creds.waiting():
        threading.Event().wait(0.01)
    assert creds.get() == ("AKIA", "s", None)  # keys at last: no cause kept
    assert creds._answered == ""


def test_with_no_cause_known_the_wait_names_the_source_asked() -> None:
    slow = Slow()
    creds = BotocoreCredentials(slow, 0.05, lambda: True, awssession.may_pass,
                                lambda: "the profile's credential_process")
    assert refused(creds) == ("no usable AWS credentials: botocore's credential chain gave none within 0.05 s "
                              "(the profile's credential_process does not answer?)")
    slow.go.set()


@pytest.mark.parametrize(("method", "source"), [
    ("container-role", "the container credentials endpoint"),
    ("custom-process", "the profile's credential_process"),
    ("iam-role", "the instance metadata service (IMDS)"),
    ("env", ""),
])
def test_the_sources_are_named(method: str, source: str) -> None:
    class Creds:
        pass

    c = Creds()
    c.method = method  # type: ignore[attr-defined]
    assert awssession.source_of(c) == source
