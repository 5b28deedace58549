"""Credential errors as lazyfs says them (redact.py): secrets of every usual
shape masked, a credential source's part capped, and the rest (the reason,
words, paths, bucket names) kept.  Before, a failing credential_process's
stderr went into logs, `status` and exit lines as it was."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import botocore.exceptions
import pytest

from lazyfs import awssession, redact
from lazyfs.cli import JsonFormatter, LibraryTracebacks, OneLineFormatter
from lazyfs.crtcreds import BotocoreCredentials, CredentialsUnavailable
from lazyfs.redact import HELPER_CHARS, masked, said

KEY_ID = "AKIAZ7FAKEKEYLEAK0QX"
TEMP_KEY_ID = "ASIAQ3EXAMPLE7TEMP0K"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documentation example
JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bWw6bGF6eWZzIn0."
       "dGhpc19pc19ub3RfYV9yZWFsX3NpZ25hdHVyZV9idXRfbG9va3NfbGlrZV9vbmU")
SESSION_TOKEN = ("IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQDmZ3Q4bVj1eYp8Vq0u6tZ8vF2kL9sN3xW7hR5"
                 "cT1aJ0gIgT8y/Xk2+Lm4Nq9rS6vU3wZ1oP7iE5dA0bC8fG2hK4jMqjwIIk///////////ARAAGgw=")
SECRETS = (KEY_ID, TEMP_KEY_ID, SECRET, JWT, SESSION_TOKEN)


def hides_all(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text
    for secret in (SECRET, JWT, SESSION_TOKEN):  # nor a good part of one
        assert secret[8:28] not in text, text


@pytest.mark.parametrize(("text", "expected"), [
    (f"failed for key {KEY_ID}", "failed for key AKIA****"),
    (f"key={TEMP_KEY_ID}.", "key=ASIA****."),
    ("role AROA1234567890ABCDEF user AIDA1234567890ABCDEF", "role AROA**** user AIDA****"),
    (f"secret {SECRET} rejected", "secret <redacted 40 chars> rejected"),
    (f"token {JWT}", f"token <redacted {len(JWT)} chars>"),
    (f"session {SESSION_TOKEN} expired", f"session <redacted {len(SESSION_TOKEN)} chars> expired"),
    ('{"SecretAccessKey": "short1", "SessionToken": "tok"}', '{"SecretAccessKey": "<redacted>", '
                                                             '"SessionToken": "<redacted>"}'),
    ("{'secret_key': 'abc', 'token': 'x y'}", "{'secret_key': '<redacted>', 'token': '<redacted>'}"),
    ("aws_secret_access_key=abc aws_session_token=def", "aws_secret_access_key=<redacted> "
                                                        "aws_session_token=<redacted>"),
    ("AWS_SECRET_ACCESS_KEY = abc; password=hunter2&x=1", "AWS_SECRET_ACCESS_KEY = <redacted>; "
                                                          "password=<redacted>&x=1"),
    ("password: hunter2, client_secret: s3cr3t", "password: <redacted>, client_secret: <redacted>"),
    ("SessionToken: abc", "SessionToken: <redacted>"),
    ("Authorization: Bearer abc.def.ghi", "Authorization: Bearer <redacted>"),
    ("url https://user:urlpassw0rd@sso.example.com/x", "url https://user:<redacted>@sso.example.com/x"),
    ("proxy http://me:p%40ss@10.0.0.1:3128 refused", "proxy http://me:<redacted>@10.0.0.1:3128 refused"),
    # After a key naming a secret and only a space (or a bare "token:"): a word shaped as a value.
    ("vault: password hunter2 refused", "vault: password <redacted> refused"),
    ("token x1y2.", "token <redacted>."),
    ("secret: abc", "secret: <redacted>"),
    ("token: x1y2", "token: <redacted>"),
    ("client_secret s3cr3t!, retry", "client_secret <redacted>!, retry"),  # (sentence punctuation kept)
    ("PASSWORD P@ss", "PASSWORD <redacted>"),
])
def test_secret_shapes_are_masked(text: str, expected: str) -> None:
    assert masked(text) == expected


@pytest.mark.parametrize("text", [
    "token expired, run aws sso login",
    "Error loading SSO Token: Token for my-sso does not exist",
    "The SSO session associated with this profile has expired or is otherwise invalid. To refresh this SSO "
    "session run aws sso login with the corresponding profile.",
    "Partial credentials found in env, missing: AWS_SECRET_ACCESS_KEY",
    "AKIAONLYTHEKEY00001 is 19 characters",
    "tokenizer.json: missing; secrets/manager: unreachable",
    "web_identity_token_file=/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
    "No such file or directory: /nonexistent/token",
    "s3://my-very-long-bucket-name-for-model-weights-production-us-east-1/models/Meta-Llama-3-70B-Instruct/"
    "model-00001-of-00030.safetensors",
    "/home/user/.aws/sso/cache/6a8d3f0c9e1b2a7d4c5e6f708192a3b4c5d6e7f8.json",
    "/opt/helpers/bin/GetCredentialsFromTheCorporateVaultService2",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "Received error when attempting to retrieve container metadata: Connection refused http://169.254.170.2/v2",
    "Error when retrieving credentials from custom-process: exit status 1",
    "",
    "password for user admin expired; wrong password",
    "secret key missing, token is invalid",
    "token /var/run/secrets/eks.amazonaws.com/serviceaccount/token not found",
    "token http://169.254.170.2/v2/credentials refused",
    "token 42 of the chain",
    "Password-less login isn't set up: the token's session ended",
])
def test_words_paths_and_names_are_left_alone(text: str) -> None:
    assert masked(text) == text


def test_a_leaky_helper_s_stderr_keeps_its_reason_and_loses_its_secrets() -> None:
    stderr = (f"credential helper: token expired, run aws sso login\nfailed for key {KEY_ID} secret {SECRET}\n"
              + json.dumps({"Version": 1, "AccessKeyId": TEMP_KEY_ID, "SecretAccessKey": SECRET,
                            "SessionToken": SESSION_TOKEN, "Expiration": "2025-01-01T00:00:00Z"}) + "\n")
    e = botocore.exceptions.CredentialRetrievalError(provider="custom-process", error_msg=stderr)
    text = said(e)
    hides_all(text)
    assert text.startswith("Error when retrieving credentials from custom-process: credential helper: token "
                           "expired, run aws sso login failed for key AKIA**** secret <redacted 40 chars>"), text
    assert "\n" not in text


def test_what_a_source_said_is_capped_and_the_rest_kept() -> None:
    stderr = "token expired, run aws sso login " + "then retry the thing " * 50 + "\n" + f"key {KEY_ID}\n"
    text = said(botocore.exceptions.CredentialRetrievalError(provider="custom-process", error_msg=stderr))
    prefix = "Error when retrieving credentials from custom-process: "
    assert text.startswith(prefix + "token expired, run aws sso login then retry") and text.endswith("...")
    assert len(text) <= len(prefix) + HELPER_CHARS + 3, len(text)
    hides_all(text)
    e = botocore.exceptions.MetadataRetrievalError(error_msg=f"Received non 200 response 500: {'x ' * 400}")
    assert len(said(e)) <= len("Error retrieving metadata: ") + HELPER_CHARS + 3
    assert len(said(RuntimeError("y " * 1000))) <= redact.MESSAGE_CHARS + 3


def test_a_secret_is_masked_before_the_cap_so_none_is_cut_in_half() -> None:
    stderr = "x" * (HELPER_CHARS - 10) + f" {SECRET}"
    text = said(botocore.exceptions.CredentialRetrievalError(provider="custom-process", error_msg=stderr))
    assert SECRET[:8] not in text, text


def test_a_file_an_error_names_is_kept() -> None:
    e = FileNotFoundError(2, "No such file or directory", "/nonexistent/token")
    assert said(e) == "No such file or directory: /nonexistent/token"


def test_awssession_says_its_errors_through_redact() -> None:
    e = botocore.exceptions.CredentialRetrievalError(provider="custom-process", error_msg=f"no: {SECRET}\n")
    assert SECRET not in str(awssession.unavailable(e)) and "no: <redacted 40 chars>" in str(awssession.unavailable(e))
    e2 = botocore.exceptions.InvalidConfigError(error_msg=f"bad line aws_secret_access_key={SECRET}")
    refused = awssession.unavailable(e2)
    assert not isinstance(refused, awssession.CredentialsUnreachable) and SECRET not in str(refused)


def test_the_crt_s_signing_says_botocore_s_error_masked() -> None:
    def fetch() -> Any:
        raise botocore.exceptions.ConnectionClosedError(endpoint_url=f"http://x/?token={JWT}")

    creds = BotocoreCredentials(fetch, 1.0, lambda: False)
    with pytest.raises(CredentialsUnavailable) as info:
        creds.get()
    hides_all(str(info.value))
    assert "ConnectionClosedError" in str(info.value)


def test_a_library_s_logged_exception_is_masked() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(LibraryTracebacks())
    handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("botocore.lazyfs-test-redact")
    logger.addHandler(handler)
    try:
        try:
            raise botocore.exceptions.CredentialRetrievalError(provider="custom-process",
                                                               error_msg=f"expired {KEY_ID} {SECRET}\n")
        except botocore.exceptions.CredentialRetrievalError:
            logger.warning("Refreshing temporary credentials failed.", exc_info=True)
    finally:
        logger.removeHandler(handler)
    hides_all(out.getvalue())
    assert "expired AKIA****" in out.getvalue()


def _logged_traceback(formatter: logging.Formatter) -> str:
    """A line carrying the traceback of one of our errors raised from botocore's (a helper's stderr
    in it), as a debug log or an unexpected error's line carries it."""
    record = None
    try:
        try:
            raise botocore.exceptions.CredentialRetrievalError(
                provider="custom-process", error_msg=f"key {KEY_ID} secret {SECRET} password hunter2x9 jwt {JWT}")
        except botocore.exceptions.CredentialRetrievalError as e:
            raise RuntimeError(f"unexpected: {redact.said(e)}") from e
    except RuntimeError:
        import sys

        record = logging.LogRecord("lazyfs.x", logging.ERROR, __file__, 1, "internal error", None, sys.exc_info())
    return formatter.format(record)


@pytest.mark.parametrize("formatter", [JsonFormatter(), OneLineFormatter("%(levelname)s %(name)s: %(message)s")],
                         ids=["json", "text"])
def test_a_traceback_in_either_log_format_is_masked_chained_causes_too(formatter: logging.Formatter) -> None:
    text = _logged_traceback(formatter)
    hides_all(text)
    assert "hunter2x9" not in text
    assert "CredentialRetrievalError" in text and "Traceback" in text  # (still the traceback it was)
    if isinstance(formatter, JsonFormatter):
        tb = json.loads(text)["traceback"]
        assert "AKIA****" in tb and "password <redacted>" in tb, tb


def test_a_credential_error_of_a_request_is_not_chained_to_botocore_s_unmasked_one() -> None:
    from lazyfs.remote import Remote

    remote = object.__new__(Remote)
    remote._refresh_due = None
    remote.endpoint = "http://s3.test"

    def head_object(**kwargs: Any) -> Any:
        raise botocore.exceptions.CredentialRetrievalError(provider="custom-process", error_msg=f"no {SECRET}")

    with pytest.raises(awssession.AccessDenied) as info:
        remote._call(head_object, "b", "k")
    assert info.value.__cause__ is None and info.value.__suppress_context__, "botocore's text rides along"
    hides_all(str(info.value))
