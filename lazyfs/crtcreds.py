"""botocore's credentials, lent to the CRT client (crt.py) through awscrt's
credentials delegate, and had within a bounded wait before a boto3 request
whose credentials are due for a refresh (remote.Remote._refreshed_in_time:
botocore's signing would otherwise refresh them, unbounded, in the request's
thread).

The delegate is called on the CRT's own threads, once per request it signs.
Two things go wrong there that the CRT cannot say:

- botocore fails to refresh (a credential_process that exits non-zero, an
  expired SSO session): whatever the delegate raises, awscrt prints its
  traceback ("Exception ignored in ...") and the request fails as
  AWS_AUTH_CREDENTIALS_PROVIDER_DELEGATE_FAILURE, which names no cause.  So
  the delegate remembers botocore's error, raises a marker that the
  unraisable hook below keeps quiet, and crt.py turns the failure into
  AccessDenied with the remembered cause: EACCES and one line, as boto3's.
- botocore's refresh hangs (a credential helper that never answers): the
  request would wait forever, then the stall watch would blame the network.
  So a refresh (keys botocore would not refresh now are handed over at
  once) is asked in a thread of its own and the delegate waits for it
  a bounded time (half of --read-timeout: it gives up before the stall
  watch).  One refresh is in flight at a time; later requests wait for that
  one rather than start more (botocore's refresh lock would queue them behind
  it anyway).  A refresh that never returns keeps its thread (botocore holds
  its refresh lock meanwhile, so no other refresh could succeed either) until
  the helper exits.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
from typing import Any, Callable

from lazyfs import redact
from lazyfs.errors import AccessDenied, CredentialsUnreachable
from lazyfs.namespace import RemoteObject
from lazyfs.wording import quoted

Credentials = tuple[str, str, "str | None"]


class CredentialsUnavailable(Exception):
    """Raised by the delegate to fail a signing; its cause is remembered and said
    by the read that failed for it, so its traceback is never printed.
    `may_pass`: the cause may pass (a source unreachable, failing or not
    answering: awssession.may_pass), so the refusal is CredentialsUnreachable."""

    def __init__(self, why: str, may_pass: bool = False) -> None:
        super().__init__(why)
        self.may_pass = may_pass


def _quiet_unavailable(previous: Callable[[Any], object]) -> Callable[[Any], object]:
    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, CredentialsUnavailable):
            previous(unraisable)
    hook.lazyfs_quiet = True  # type: ignore[attr-defined]
    return hook


class BotocoreCredentials:
    """The delegate: botocore's credentials now, or a remembered reason why not."""

    def __init__(self, fetch: Callable[[], Credentials], wait_s: float,
                 due: Callable[[], bool] = lambda: True,
                 may_pass: Callable[[BaseException], bool] = lambda e: False,
                 source: Callable[[], str] = lambda: "", answered: str = "") -> None:
        self._fetch = fetch  # remote.Remote.frozen_credentials: refreshes when due, raises when it cannot
        self._wait_s = wait_s
        self._due = due  # whether botocore would refresh them now (False: static keys, or fresh ones)
        self._may_pass = may_pass  # whether botocore's error may pass (awssession.may_pass)
        self._source = source  # the source they come from or are asked of, in words (awssession.source_of)
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future[Credentials] | None = None
        self._failure = ""  # why the last call gave no credentials ("" once one did)
        self._passing = False  # ... and whether that may pass
        # Why botocore's last answer gave none ("" once one did): a mount's start's (`answered`), or a
        # refresh's, also one the wait gave up on.  What a wait that gives up says: the cause, not the wait.
        self._answered = answered
        if not getattr(sys.unraisablehook, "lazyfs_quiet", False):
            sys.unraisablehook = _quiet_unavailable(sys.unraisablehook)

    def __call__(self) -> Any:
        from awscrt import auth

        access, secret, token = self.get()
        return auth.AwsCredentials(access, secret, token)

    def get(self) -> Credentials:
        try:
            # Keys botocore holds and would not refresh now come at once, with no thread (the CRT asks at
            # every request it signs); a refresh, which may run a helper that hangs, in a thread of its own.
            creds = self._fetch() if not self._due() else self._refreshed()
        except concurrent.futures.TimeoutError:  # (a source that does not answer now may later)
            raise self._failed(self._unanswered(), True) from None
        except Exception as e:  # none at all or none yet (AccessDenied); botocore's: an expired SSO token...
            raise self._failed(*self._why(e)) from None
        self._failure = self._answered = ""
        return creds

    def _why(self, e: Exception) -> tuple[str, bool]:
        """What botocore's `e` says, and whether it may pass."""
        if isinstance(e, AccessDenied):  # remote.py, awssession.py said it
            return str(e), isinstance(e, CredentialsUnreachable)
        return f"no usable AWS credentials ({type(e).__name__}: {redact.said(e)})", self._may_pass(e)

    def _unanswered(self) -> str:
        """A wait that gave up: botocore's last answer if it gave one (a source asked again that answers
        slower than the wait, as a container endpoint retrying, is still that), else the source asked."""
        if self._answered:
            return f"{self._answered} (asked again: no answer within {self._wait_s:g} s)"
        return (f"no usable AWS credentials: botocore's credential chain gave none within {self._wait_s:g} s "
                f"({self._source() or 'a credential_process or SSO helper'} does not answer?)")

    def _refreshed(self) -> Credentials:
        with self._lock:
            pending = self._pending
            if pending is None or pending.done():
                pending = self._pending = self._start()
        return pending.result(timeout=self._wait_s)

    def waiting(self) -> bool:
        """Whether a refresh is under way (a request that shows no progress may be waiting for it)."""
        pending = self._pending
        return pending is not None and not pending.done()

    def refused(self, obj: RemoteObject, crt_error: str) -> AccessDenied:
        """What a request failed for want of credentials says: the remembered cause."""
        why = self._failure or f"no usable AWS credentials ({crt_error})"
        kind = CredentialsUnreachable if self._failure and self._passing else AccessDenied
        return kind(f"{quoted(obj.uri)}: {why}", bucket=obj.bucket, key=obj.key)

    def _failed(self, why: str, may_pass: bool) -> CredentialsUnavailable:
        self._failure, self._passing = why, may_pass
        return CredentialsUnavailable(why, may_pass)

    def _start(self) -> concurrent.futures.Future[Credentials]:
        future: concurrent.futures.Future[Credentials] = concurrent.futures.Future()

        def run() -> None:
            try:
                creds = self._fetch()
            except BaseException as e:  # handed to the waiting delegate, if it still waits
                if isinstance(e, Exception):
                    self._answered = self._why(e)[0]
                future.set_exception(e)
            else:
                self._answered = ""
                future.set_result(creds)

        # A daemon: a helper that never answers must not keep the process from exiting.
        threading.Thread(target=run, name="crt-credentials", daemon=True).start()
        return future


def wait_for_credentials(read_timeout: float) -> float:
    """How long a signing waits for botocore: half of --read-timeout, so that it
    gives up, naming credentials, before the stall watch blames the network."""
    return max(1.0, read_timeout / 2)

