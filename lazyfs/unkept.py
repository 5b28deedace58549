"""A download the cache budget does not keep (a file larger than
--cache-max-size: `Download.keep` is False) exists for its readers only.
Once the last of them is gone it is stopped: nothing would ever read the
rest of its bytes (they used to be fetched and verified all the same, and
thrown away, on every open), and its temporary file, which only `keep`
downloads may make room for in the budget, is removed.  Trio thread only."""

from __future__ import annotations

import logging

from lazyfs.download import Download
from lazyfs.errors import LazyfsError
from lazyfs.runner import Runner
from lazyfs.wording import quoted

log = logging.getLogger(__name__)


class NobodyReads(LazyfsError):
    """What a stopped unkept download answers anything that still asks it (nothing should)."""


def stop_unread(runner: Runner, dl: Download) -> None:
    """Stop `dl`, which is not kept and which nobody reads or opens any more.
    Its requests stop at their next piece (`cancelled`), it leaves the
    registry at once (a new open starts afresh), and its file is condemned
    now (such an open never resumes it) and removed once its last pin goes
    (Download.maybe_close_fd)."""
    if dl.keep or dl.finished.is_set() or dl.error is not None or dl.readers > 0:
        return
    dl.cancelled = True
    e = NobodyReads(f"{quoted(dl.obj.uri)}: download stopped: nobody reads it and it is not kept")
    e.logged = True  # type: ignore[attr-defined]
    dl.error = e
    runner.store.partials.condemn(dl.partial)
    # Opened and closed with every read answered by the page cache: nothing to say.
    log.log(logging.INFO if dl.bytes_fetched else logging.DEBUG,
            "%s: nobody reads it any more; its download stopped after %.1f of %.1f MiB "
            "(larger than the cache budget: not kept)", quoted(dl.obj.uri), dl.bytes_fetched / 2**20,
            dl.obj.size / 2**20, extra={"event": "unkept_stopped", "key": dl.obj.key, "bytes": dl.bytes_fetched})
    runner.retire(dl)
