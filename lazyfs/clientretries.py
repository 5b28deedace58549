"""botocore's retries of a request, one log line each.

botocore retries a request that fails before its response (a 5xx, SlowDown,
a refused or reset connection) on its own, with backoff, and says nothing:
a reader of a file whose GETs kept failing waited 17 s with no line at all.
This listens to two of the client's events, with no import of botocore: a
failed attempt ("needs-retry") notes its cause for the calling thread, and
the request built again for the next attempt ("request-created", attempt 2
on) logs the line, so a line is logged only for a retry botocore makes.

A GET's retry (a reader may be waiting) is one INFO line; a listing's or a
HEAD's is DEBUG: a listing that keeps failing logs its failure once
(refresher.py), not each request's retries.  Runs in the request's worker
thread; the state is that thread's own (threading.local).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from lazyfs.wording import quoted

log = logging.getLogger(__name__)

_this_thread = threading.local()


def calling(op: str, bucket: str, key: str) -> None:
    """The calling thread's next request is `op` ("GET", "LIST", "HEAD") of bucket/key."""
    _this_thread.request = (op, bucket, key)
    _this_thread.cause = ""


class RetryLines:
    """Logs each retry a client with `attempts` attempts a request makes."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts

    def register(self, events: Any) -> None:
        """Listen to the S3 client's events (`client.meta.events`)."""
        events.register("needs-retry.s3", self.attempt_failed)
        events.register("request-created.s3", self.request_created)

    def attempt_failed(self, response: Any = None, caught_exception: BaseException | None = None,
                       **_: Any) -> None:
        """An attempt ended; botocore decides whether it is tried again (this returns None: no say)."""
        if caught_exception is not None:
            _this_thread.cause = f"{type(caught_exception).__name__}: {caught_exception}"
        elif response is not None:
            http, parsed = response
            error = parsed.get("Error", {}) if isinstance(parsed, dict) else {}
            _this_thread.cause = f"{error.get('Code') or 'HTTP error'}: HTTP {http.status_code}"

    def request_created(self, request: Any = None, **_: Any) -> None:
        attempt = int(getattr(request, "context", {}).get("retries", {}).get("attempt", 1))
        if attempt < 2:
            return
        op, bucket, key = getattr(_this_thread, "request", ("request", "", ""))
        cause = getattr(_this_thread, "cause", "") or "failed"
        log.log(logging.INFO if op == "GET" else logging.DEBUG, "%s: %s; retrying the %s (attempt %d of %d)",
                quoted(f"s3://{bucket}/{key}"), cause, op, attempt, self.attempts)
