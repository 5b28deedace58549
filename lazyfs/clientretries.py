"""botocore's attempts of a request: each counted, each retry logged.

botocore retries a request that fails before its response (a 5xx, SlowDown,
a refused or reset connection) on its own, with backoff, and says nothing:
a reader of a file whose GETs kept failing waited 17 s with no line at all,
and the metrics, which counted calls of the client, showed neither the
attempts nor their failures (S3 throttling looked like a quiet network).
This listens to the client's events, with no import of botocore:

- an attempt about to go on the wire ("before-send") is a request
  (`STATS.s3_requests`);
- an attempt that ended ("needs-retry", after every attempt, the last one
  too) with an error status or no response at all is a failed request
  (`STATS.s3_errors`), and its cause is noted for the calling thread;
- the request built again for the next attempt ("request-created", attempt
  2 on) is a retry (`STATS.retries`) and logs its line, so a line is logged
  only for a retry botocore makes.

A GET's retry (a reader may be waiting) is one INFO line; a listing's or a
HEAD's is DEBUG: a listing that keeps failing logs its failure once
(refresher.py), not each request's retries.  Runs in the request's worker
thread; the state is that thread's own (threading.local), the counters are
bumped under their lock (stats.py).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from lazyfs.exhausted import descriptor_errno, descriptors
from lazyfs.repeats import retry_line, shape
from lazyfs.stats import STATS
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

_this_thread = threading.local()

# The metrics' names of botocore's operations (the last part of an event's name).
OPS = {"ListObjectsV2": "LIST", "GetObject": "GET", "HeadObject": "HEAD"}


def calling(op: str, bucket: str, key: str) -> None:
    """The calling thread's next request is `op` ("GET", "LIST", "HEAD") of bucket/key."""
    _this_thread.request = (op, bucket, key)
    _this_thread.cause = ""


def op_of(event_name: str) -> str:
    """The op an event is about: "before-send.s3.GetObject" -> "GET"."""
    operation = event_name.rsplit(".", 1)[-1]
    return OPS.get(operation, operation)


class ClientAttempts:
    """Counts the attempts of a client with `attempts` attempts a request, and logs each retry."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts

    def register(self, events: Any) -> None:
        """Listen to the S3 client's events (`client.meta.events`)."""
        events.register("before-send.s3", self.attempt_sent)
        events.register("needs-retry.s3", self.attempt_ended)
        events.register("request-created.s3", self.request_created)

    def attempt_sent(self, event_name: str = "", **_: Any) -> None:
        """An attempt goes on the wire (this returns None: botocore sends it)."""
        STATS.bump("s3_requests", op_of(event_name))

    def attempt_ended(self, response: Any = None, caught_exception: BaseException | None = None,
                      event_name: str = "", **_: Any) -> None:
        """An attempt ended; botocore decides whether it is tried again (this returns None: no say)."""
        if caught_exception is not None:
            # No socket for want of a descriptor: botocore calls it a failed connection (exhausted.py).
            err = descriptor_errno(caught_exception)
            _this_thread.cause = f"cannot open a connection to the object store: {descriptors(err)}" if err else \
                f"{type(caught_exception).__name__}: {caught_exception}"
        elif response is not None and response[0].status_code >= 300:
            http, parsed = response
            error = parsed.get("Error", {}) if isinstance(parsed, dict) else {}
            _this_thread.cause = f"{error.get('Code') or 'HTTP error'}: HTTP {http.status_code}"
        else:
            return
        STATS.bump("s3_errors", op_of(event_name))

    def request_created(self, request: Any = None, **_: Any) -> None:
        attempt = int(getattr(request, "context", {}).get("retries", {}).get("attempt", 1))
        if attempt < 2:
            return
        STATS.bump("retries")
        op, bucket, key = getattr(_this_thread, "request", ("request", "", ""))
        cause = getattr(_this_thread, "cause", "") or "failed"
        # (each open of a file whose GETs keep failing retries the same way: said once a minute, repeats.py)
        retry_line(log, logging.INFO if op == "GET" else logging.DEBUG, (op, bucket, key, shape(cause), attempt),
                   "%s: %s; retrying the %s (attempt %d of %d)", quoted(f"s3://{bucket}/{key}"), cause, op, attempt,
                   self.attempts)
