"""How lazyfs's botocore client retries: every request gets all its retries
(`--retries`), with backoff.py's schedule between a GET's.

botocore makes both the retry quota and the backoff as it registers a new
client's retries (botocore.retries.standard.register_retry_handler calls
quota.RetryQuota() and ExponentialBackoff()), and no setting leaves the one
out or sets the other: the classes are swapped for ours while our client is
made, one client at a time.  tests/unit/test_retry_quota.py fails if a
botocore upgrade makes them another way.
"""

from __future__ import annotations

import threading
from typing import Any

import botocore.retries.quota
import botocore.retries.standard
import botocore.session

from lazyfs.backoff import retry_delay


class _NeverSpent(botocore.retries.quota.RetryQuota):
    """botocore's retry quota, never spent: --retries N is N retries of each
    request (README), however many fail at once.

    In standard mode a client's requests share one quota of 500: a retry
    after no response costs 14, a throttled one 5, and only successes give
    some back; a request that finds it spent is not retried at all.  16
    parallel GETs spent it within seconds of an outage (a tester's
    `--retries 10` ended at `attempt 4 of 11`, as `--retries 4`), and right
    after one a failure was not retried.  Retries are bounded without it:
    N per request, botocore's backoff between them, at most
    --max-connections GETs (and the lister's few LISTs) at a time."""

    def acquire(self, capacity_amount: int) -> bool:
        return True


class _OurBackoff(botocore.retries.standard.ExponentialBackoff):
    """backoff.py's schedule for a GET's retries (botocore's waits 50 ms, doubling, for any error but
    throttling: a 1.5 s burst of 500s failed the read); a store's `x-amz-retry-after` still counts.  A
    LIST's and a HEAD's keep botocore's: the first listing's refused connections make an offline start
    in about a second, and a listing that keeps failing is retried by the lister itself (lister.py)."""

    def delay_amount(self, context: Any) -> float:
        if getattr(context.operation_model, "name", "GetObject") != "GetObject":
            return float(super().delay_amount(context))
        delay = retry_delay(context.attempt_number)
        after = self._get_retry_after_delay(context) if hasattr(self, "_get_retry_after_delay") else None
        return delay if after is None else max(delay, min(after, delay + 5))


_SWAP = threading.Lock()


def client(core: botocore.session.Session, **kwargs: Any) -> Any:
    """An S3 client of `core` whose requests each get all their retries (_NeverSpent), our backoff between them."""
    quota, standard = botocore.retries.quota, botocore.retries.standard
    with _SWAP:
        stock, quota.RetryQuota = quota.RetryQuota, _NeverSpent  # type: ignore[misc]
        stock_backoff, standard.ExponentialBackoff = standard.ExponentialBackoff, _OurBackoff  # type: ignore[misc]
        try:
            return core.create_client("s3", **kwargs)
        finally:
            quota.RetryQuota = stock  # type: ignore[misc]
            standard.ExponentialBackoff = stock_backoff  # type: ignore[misc]
