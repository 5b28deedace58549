"""A mount's first requests, begun before the FUSE machinery is imported.

The time from `lazyfs mount` to its ready line is the interpreter's imports
(trio, pyfuse3 and the engine: about a third of it) and the object store's
round trips (connecting, then listing each folder once: a round trip each,
tens of milliseconds on S3, more with TLS).  `cli` creates the client and
starts the listing on a thread first, and only then imports `mount`: the
imports run while the thread waits on its socket, which holds no GIL.

Nothing here imports trio or pyfuse3.
"""

from __future__ import annotations

import logging
import threading
import time

from lazyfs.config import MountConfig, Source
from lazyfs.errors import RemoteUnavailable
from lazyfs.namespace import RemoteObject
from lazyfs.remote import Remote
from lazyfs.stats import TIMINGS

log = logging.getLogger(__name__)

# A start-up check still unanswered after this long is said so in one line,
# so that a mount waiting on an object store that does not answer is not silent.
SAY_WAITING_AFTER_S = 1.0


class FirstListing:
    """The object store client, and the first page of every folder being
    listed on a thread (one request each: `Remote.probe`).  A pinned mount
    asks nothing at start: its lock is its listing."""

    def __init__(self, cfg: MountConfig) -> None:
        if cfg.metrics_port is not None:
            TIMINGS.enable()  # from the first request on (prometheus_client only when asked)
        # Credentials that cannot be had now for a reason that may pass are no error yet: the start-up
        # listing fails for them (CredentialsUnreachable), and the mount starts offline (offlinestart.py).
        self.remote = Remote(cfg.remote, late_credentials=True)
        self._sources = list(cfg.sources) if cfg.lock is None else []
        # How long the mount waits for the check: one request's worth, its
        # connect timeout and then --read-timeout for the answer.  botocore
        # retries a request that timed out (--retries), so an endpoint that
        # accepts connections and never answers held the start for every
        # attempt (5 x 20 s by default) where a refused connection fails in
        # milliseconds.  A request with no answer for --read-timeout is a
        # stalled one by the mount's own measure: the object store is then as
        # good as unreachable, and the mount starts as it would for one that
        # refused the connection (offline, from what the store holds).  An
        # answer, even a refusal (a wrong bucket, bad credentials), comes long
        # before, and so does a retried 5xx now and then.
        self.patience = cfg.remote.connect_timeout + cfg.remote.read_timeout
        self._handed: dict[Source, list[RemoteObject]] | BaseException | None = None
        self._given_up = False  # result() stopped waiting: a late outcome is dropped
        self._lock = threading.Lock()  # the outcome's hand-over (docs/concurrency.md)
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._probe, name="lazyfs-first-listing", daemon=True)
        self._thread.start()

    def _probe(self) -> None:
        listed: dict[Source, list[RemoteObject]] = {}
        outcome: dict[Source, list[RemoteObject]] | BaseException = listed
        try:
            if self._sources and self.remote.start_failure is not None:
                raise self.remote.start_failure  # the start asked already, within its bounded wait: not again
            for source in self._sources:
                page = self.remote.probe(source)
                if page.next_token is None:
                    listed[source] = page.objects
        except BaseException as e:  # handed to the main thread by result()
            outcome = e
        with self._lock:
            if not self._given_up:  # else nobody reads it: the mount went on without it
                self._handed = outcome

    def result(self) -> dict[Source, list[RemoteObject]]:
        """Each folder that fits in its first page, listed; raises what the
        listing raised (a wrong bucket or credentials: RemoteError; error
        statuses through the retries: RemoteFailing, the object store is
        reachable; no network: RemoteUnavailable; credentials that cannot be
        had for now: CredentialsUnreachable), once it is over, or RemoteUnavailable
        after `patience` seconds without an outcome.  The thread then goes on
        until botocore gives up, and what it finds is dropped: the mount's
        own listing (the refresher) asks again."""
        self._thread.join(max(0.0, self._started + SAY_WAITING_AFTER_S - time.monotonic()))
        if self._thread.is_alive():
            log.info("waiting for the object store at %s to answer (at most %g s; then the mount starts "
                        "from what its store holds)", self.remote.endpoint, self.patience)
            self._thread.join(max(0.0, self._started + self.patience - time.monotonic()))
        if not self._sources and self.remote.start_failure is not None:  # a pinned mount asks nothing at start
            log.warning("%s: starting with the lock's listing; a download fails with EACCES until AWS credentials "
                        "can be had", self.remote.start_failure)
        with self._lock:
            outcome, self._given_up = self._handed, True
        if outcome is None:
            raise RemoteUnavailable(f"the object store at {self.remote.endpoint} did not answer within "
                                    f"{self.patience:g} s")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
