"""The mount's `.lazyfs/states.json`: every served file's state, in one read.

`lazyfs status` on a running mount used to ask each file for its
`user.lazyfs.state` and `user.lazyfs.verified`: two FUSE requests and two
store-thread hops per file.  On 20,000 files that took 12 s and 9 s of the
daemon's CPU (a minute for 60,000), nearly all of it the per-request machinery
(pyfuse3, trio's thread hand-offs), not the store: a readiness probe could not
answer within a probe's timeout.  An open of this file judges them all at once,
with the same rules as a getxattr (Fetcher.state_of): a download in progress
from the trio side, every other file by `Store.local_state`, CHUNK files per
hop on a thread of its own (one snapshot at a time; it never takes the store
threads opens wait for), each hop abandoned after STATE_WAIT_S as a getxattr's
look is (EIO: a store that does not answer).

Its content, one JSON object: `{"listed": bool, "files": [[key, size, state,
verified], ...]}`, in no particular order; a file whose state could not be
read has state `null`, and why in place of `verified` (a descriptor refused
names the daemon's limit: `lazyfs status` says it, never `missing`).  A name
a 404 took that is being asked about again (recheck.py) is a row too,
`missing`: gone from the tree for now, not for good, so a readiness probe
must not call the mount ready.  `listed` is false before the mount's first listing
(its tree then names only what lookups found).
"""

from __future__ import annotations

import json
import logging
from typing import Sequence

import trio

from lazyfs import wording
from lazyfs.catalog import Catalog
from lazyfs.errors import StoreError
from lazyfs.exhausted import strerror
from lazyfs.fetch import STATE_WAIT_S, Fetcher
from lazyfs.filestate import ContentChecks, FileState
from lazyfs.namespace import RemoteObject, Tree
from lazyfs.store import Store
from lazyfs.threads import run_sync

# Files judged per thread hop: a few milliseconds of the trio thread's work
# each (building their rows), and few enough that a slow store is noticed
# within STATE_WAIT_S of the hop that met it.
CHUNK = 500
# (key, size, state, how it was verified); without a state, why it could not be read
Row = tuple[str, int, "str | None", "str | None"]

log = logging.getLogger(__name__)


class StatesFile:
    """Snapshots of every file's state for `.lazyfs/states.json`."""

    def __init__(self, catalog: Catalog, fetcher: Fetcher) -> None:
        self._catalog = catalog
        self._fetcher = fetcher
        # One thread: two probes at once take turns rather than twice the store's attention.
        self._thread = trio.CapacityLimiter(1)

    async def snapshot(self) -> bytes:
        listed, tree = self._catalog.listed.is_set(), self._catalog.tree
        objs = await run_sync(_files, tree)  # (O(files), no store I/O: trio's own threads)
        rows: list[Row] = [(obj.key, obj.size, FileState.MISSING.value, "")  # (not in the tree: a 404 took them)
                           for obj in self._catalog.asked_again() if tree.find(obj.key) is None]
        for start in range(0, len(objs), CHUNK):
            rows += await self._judge(objs[start:start + CHUNK])
        unread = [(key, why) for key, _, state, why in rows if state is None]
        if unread:  # one line for the snapshot (each file's getxattr would have logged its own)
            log.warning("states.json: the state of %s could not be read from the store (%s: %s%s)",
                        wording.count(len(unread), "file"), wording.quoted(unread[0][0]), unread[0][1],
                        ", ..." if len(unread) > 1 else "")
        return await run_sync(_encoded, listed, rows)

    async def _judge(self, objs: Sequence[RemoteObject]) -> list[Row]:
        transfers = [self._fetcher.transfer(obj) for obj in objs]  # (trio-side: read here, before the hop)
        quiet = [obj for obj, transfer in zip(objs, transfers, strict=True) if transfer is None]
        prebaked = self._fetcher.prebaked
        checked = prebaked.checked if prebaked is not None else None  # (--verify etag, pinned)
        judged: list[Row] = []
        if quiet:
            with trio.move_on_after(STATE_WAIT_S) as waited:  # abandoned then: it holds no descriptor once it returns
                judged = await run_sync(_judged, self._fetcher.store, quiet, checked,
                                        limiter=self._thread, abandon_on_cancel=True)
            if waited.cancelled_caught:
                raise _silent_store(len(quiet))
        found = iter(judged)
        return [next(found) if transfer is None else (obj.key, obj.size, FileState.DOWNLOADING.value, "")
                for obj, transfer in zip(objs, transfers, strict=True)]


def _files(tree: Tree) -> list[RemoteObject]:
    return list(tree.files())


def _judged(store: Store, objs: Sequence[RemoteObject], checked: ContentChecks | None) -> list[Row]:
    """Each file's state as a getxattr answers it (store thread); a file that
    cannot be looked at (EACCES, EIO) is one row without a state, not a failed
    snapshot."""
    rows: list[Row] = []
    for obj in objs:
        try:
            local = store.local_state(obj, checked)
        except OSError as e:
            rows.append((obj.key, obj.size, None, strerror(e)))  # (why: logged, and told to status)
            continue
        rows.append((obj.key, obj.size, local.state.value, local.verified))
    return rows


def _encoded(listed: bool, rows: list[Row]) -> bytes:
    return json.dumps({"listed": listed, "files": rows}, separators=(",", ":")).encode() + b"\n"


def _silent_store(files: int) -> StoreError:
    return StoreError(f"the store did not answer within {STATE_WAIT_S:g} s about the states of "
                      f"{wording.count(files, 'file')} (is its filesystem answering?)")
