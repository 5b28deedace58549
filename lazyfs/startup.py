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

import threading

from lazyfs.config import MountConfig, Source
from lazyfs.namespace import RemoteObject
from lazyfs.remote import Remote
from lazyfs.stats import TIMINGS


class FirstListing:
    """The object store client, and the first page of every folder being
    listed on a thread (one request each: `Remote.probe`).  A pinned mount
    asks nothing at start: its lock is its listing."""

    def __init__(self, cfg: MountConfig) -> None:
        if cfg.metrics_port is not None:
            TIMINGS.enable()  # from the first request on (prometheus_client only when asked)
        self.remote = Remote(cfg.remote)
        self._sources = list(cfg.sources) if cfg.lock is None else []
        self._complete: dict[Source, list[RemoteObject]] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._probe, name="lazyfs-first-listing", daemon=True)
        self._thread.start()

    def _probe(self) -> None:
        try:
            for source in self._sources:
                page = self.remote.probe(source)
                if page.next_token is None:
                    self._complete[source] = page.objects
        except BaseException as e:  # handed to the main thread by result()
            self._error = e

    def result(self) -> dict[Source, list[RemoteObject]]:
        """Each folder that fits in its first page, listed; raises what the
        listing raised (a wrong bucket or credentials: RemoteError; no
        network: RemoteUnavailable), once it is over.  botocore's timeouts
        and retries bound the wait."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._complete
