"""The wait before a GET's next attempt, whatever failed and whichever
client sends it.

One schedule for every retry of a GET (botocore's of a request that got no
answer or an error status, lazyfs's own of a body that broke off, the CRT's
GETs'): 0.4 s before the second attempt, doubling to at most 8 s, each times
a random factor of 0.5 to 1.5 (so parallel requests failing together do not
come back together).  The default 4 retries wait 3 to 9 s in all: they ride
out a gateway's restart or a burst of 5xx of a few seconds.  botocore's own
schedule (1.44) waits 50 ms times a random factor
of 0 to 1, doubling, for any error but throttling: its 4 retries ended within
0.75 s, and a 1.5 s burst of 500s failed the read with EIO (remote.py puts
this schedule in its place for GETs; LISTs and HEADs keep botocore's).
"""

from __future__ import annotations

import random

FIRST_S = 0.4
LONGEST_S = 8.0


def retry_delay(failed: int) -> float:
    """Seconds to wait after the `failed`-th failed attempt of a request (1: the first)."""
    return min(LONGEST_S, FIRST_S * 2.0 ** (failed - 1)) * random.uniform(0.5, 1.5)
