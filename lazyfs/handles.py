"""Open files and the read path.

A handle reads either a current local copy (a mapping of its own) or a
download (the download's mapping, waiting for the bytes it covers first).
Bytes already on disk are served on the trio thread from a read-only mmap:
they come from the page cache (or a local disk), and a thread hop per read
would cost more than the read itself.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Callable

import cachetools
import trio

from lazyfs.download import Download
from lazyfs.errors import LazyfsError, RemoteUnavailable, StoreError, again
from lazyfs.exhausted import strerror
from lazyfs.fetch import Fetcher, LocalOrTransfer
from lazyfs.filemap import FileMap
from lazyfs.lastbytes import REFUSED, ServedBadBytes, refuse_stale_generation, verify_deadline
from lazyfs.namespace import RemoteObject, Version
from lazyfs.repeats import FailureLoops
from lazyfs.stats import STATS
from lazyfs.store import LocalCopy
from lazyfs.transfer import Transfer
from lazyfs.unkept import stop_unread
from lazyfs.wording import quoted

log = logging.getLogger(__name__)


# The share of a shard a reader has been served when the next one is fetched
# ahead (Handles._read_through).  Random reads that fault a quarter of a file
# in, each with the kernel's read-around, stay below it.
READ_THROUGH = 0.75

# A whole-file open looks this often whether bytes of its file arrived (each
# arrival gives it the read deadline again: Handles._wait_whole).
WHOLE_FILE_LOOK_S = 0.5

class BadHandle(LazyfsError):
    errno = errno.EBADF


@dataclass(slots=True)
class OpenFile:
    obj: RemoteObject
    ino: int  # the kernel's inode for it (0: not through the kernel)
    fd: int  # -1 while reading through a download
    fmap: FileMap | None  # the local copy's bytes (None: read through the download)
    download: Transfer | None
    # Where the bytes come from: "cached", "prebaked" or "s3" (a download).
    source: str
    # The shard a loader reads after this one (modelaware.next_shard), until
    # it is sent for; and the bytes served through this handle so far.
    following: RemoteObject | None = None
    served: int = 0
    dev: int = 0  # the local copy's filesystem (LocalCopy.dev)
    generation: int = 0  # the download's attempt whose bytes it was served (lastbytes.py)
    # The kernel may hold pages of a copy served before and refused since
    # (probe.PrebakedCheck.withdrawn), or of bytes that failed verification
    # (Handles.bytes_were_bad): this open must not keep them.
    pages_stale: bool = False


class Handles:
    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self._open: dict[int, OpenFile] = {}
        self._next = 1
        # The shard a loader opens after this one (set by the mount from its
        # catalog, see modelaware.next_shard), fetched ahead (see _read_through).
        self.next_shard: Callable[[RemoteObject], RemoteObject | None] = lambda obj: None
        # The files loaders read right after this one (modelaware.companions), fetched when it is opened.
        self.companions: Callable[[RemoteObject], list[RemoteObject]] = lambda obj: []
        # Files already announced in the log (bounded: a tree of millions of
        # files must not grow it forever; an old entry is announced again).
        self._announced: cachetools.LRUCache[tuple[str, str, str], bool] = cachetools.LRUCache(maxsize=100_000)
        # Whether the kernel can read a local copy itself (passthrough.py):
        # without it, waiting for a whole file would only delay its readers.
        self.passes_through: Callable[[], bool] = lambda: False
        # The listed shards of the checkpoint whose index this is (checkpoint.index_shards).
        self.index_shards: Callable[[RemoteObject], list[RemoteObject]] = lambda obj: []
        # Shards of checkpoints a loader is walking: those of an index it
        # opened, the next shard of one read through (bounded like _announced).
        self._walked: cachetools.LRUCache[Version, bool] = cachetools.LRUCache(maxsize=10_000)
        # Each file's failed reads in a row, across its handles (repeats.py).
        self._failing = FailureLoops()
        # Versions whose downloaded bytes failed verification since an open of a whole copy (bytes_were_bad).
        self._bad_bytes: set[Version] = set()

    def __len__(self) -> int:
        return len(self._open)

    async def open(self, obj: RemoteObject, ino: int = 0, direct: bool = False) -> int:
        """A handle reading `obj` (whose inode is `ino`, see `release_inode`),
        opened with O_DIRECT when `direct`.  The cache budget keeps its file
        from the start of the open to the handle's release: a whole-file open
        waits for its file with no handle yet."""
        budget = self.fetcher.budget
        if budget is not None:
            budget.use(obj.key)
        try:
            return await self._open_handle(obj, ino, direct)
        except BaseException as e:
            if budget is not None:
                budget.unuse(obj.key)
            if isinstance(e, OSError):  # a descriptor or mapping refused (EMFILE near the limit): one line naming it
                raise StoreError(f"{quoted(obj.uri)}: cannot open it from the store: {strerror(e)}",
                                 e.errno or errno.EIO) from None
            raise

    async def _open_handle(self, obj: RemoteObject, ino: int, direct: bool) -> int:
        if self.fetcher.cfg.whole_file_open == "checkpoint" and self.passes_through():
            shards = self.index_shards(obj)
            for shard in shards:
                self._walked[shard.version] = True
            if shards:  # a loader opens the first one next: it need not wait for the request
                self.fetcher.warm(shards[0])
        got = await self.fetcher.acquire(obj)
        whole = self._opens_whole(obj, direct)
        if whole and not isinstance(got, LocalCopy):
            self._fetch_next_behind(obj, got)
            got = await self._whole(obj, got)
        try:
            following = await self._following(obj, isinstance(got, LocalCopy), whole)
        except BaseException:
            if isinstance(got, LocalCopy):
                os.close(got.fd)
            raise
        if isinstance(got, LocalCopy):
            try:
                fmap = FileMap(got.fd, obj.size, self.fetcher.pages)
            except BaseException:
                os.close(got.fd)
                raise
            of = OpenFile(obj, ino, got.fd, fmap, None, got.state.value, dev=got.dev)
            STATS.opens_hit += 1
            self._announce(obj, got)
        else:
            got.add_reader()
            of = OpenFile(obj, ino, -1, None, got, "s3")
            STATS.opens_miss += 1
        of.pages_stale = (self.fetcher.prebaked is not None and self.fetcher.prebaked.withdrawn(obj)) \
            or self._pages_of_bad_bytes(obj, whole=isinstance(got, LocalCopy))
        fh = self._next
        self._next += 1
        self._open[fh] = of
        of.following = following
        if self.fetcher.cfg.model_readahead:
            for companion in self.companions(obj):
                self.fetcher.warm(companion)
        return fh

    def _opens_whole(self, obj: RemoteObject, direct: bool) -> bool:
        """Does an open of `obj` wait for all of it (--whole-file-open)?  A
        loader that walks a sharded checkpoint reads each shard whole, and
        the kernel reading a complete copy itself costs lazyfs no CPU per
        byte, where answering each read as the bytes arrive costs a second
        copy of every byte (measured: a cold load in half the time).  A
        reader of a few bytes would wait for the last one, so by default
        only shards of a checkpoint a loader walks wait: named by an index
        it opened (loaders read it first), or the next one after a shard
        read through.  Never an O_DIRECT open: such a reader (the Run:ai
        streamer, as vLLM's runai_streamer loader reads a folder) opens
        every shard at once and reads each in large parallel requests, so
        waiting held its first tensor back until whole shards were in
        (docs/bench-after.md: first tensor 11.4 s, all 13.1; now 5.2, 9.6).
        Never a file larger than the cache budget: it is not kept, so no
        copy would be there once it is whole, and the open downloaded it a
        second time to stream it."""
        mode = self.fetcher.cfg.whole_file_open
        budget = self.fetcher.budget
        if mode == "never" or not self.passes_through() or (budget is not None and not budget.fits(obj)):
            return False
        return mode == "always" or (obj.version in self._walked and not direct)

    def _fetch_next_behind(self, obj: RemoteObject, dl: Transfer) -> None:
        """A whole-file open of a shard a loader walks: its next shard starts
        as soon as this one has nothing left to request (Fetcher.warm_after),
        not once this one is verified, published and read.  Until then the
        connections idled through the shard's last requests, its verification
        (with an MD5 ETag, a hash that ends well after the last byte on a busy
        CPU) and the loader's reading of it: the shards came one after the
        other, each at about half the link's speed."""
        following = self.next_shard(obj) if self.fetcher.cfg.model_readahead else None
        if following is not None:
            self._start_next(following, behind=dl)

    def _start_next(self, following: RemoteObject, behind: Transfer | None) -> None:
        """Fetch the shard a loader walks to next: at once, or once `behind`
        (the shard it reads now) has nothing left to request."""
        self._walked[following.version] = True
        if behind is None or behind.complete:
            self.fetcher.warm(following)
        else:
            self.fetcher.warm_after(behind, following)

    async def _whole(self, obj: RemoteObject, dl: LocalOrTransfer) -> LocalOrTransfer:
        """`obj`'s local copy once its download `dl` is published (or `dl`,
        should the store not have it by then)."""
        assert not isinstance(dl, LocalCopy)
        log.info("%s: the open waits for all %d bytes, then the kernel reads the copy itself (--whole-file-open)",
                 quoted(obj.uri), obj.size, extra={"event": "whole_file_open", "key": obj.key, "bytes": obj.size})
        dl.add_reader(served=False)  # a reader waits: ahead of the prefetches
        try:
            await self._wait_whole(obj, dl)
            if dl.error is not None:
                raise again(dl.error)
        finally:
            dl.drop_reader(served=False)
        return await self.fetcher.acquire(obj)

    async def _wait_whole(self, obj: RemoteObject, dl: Transfer) -> None:
        """Return once `dl` is over (published, or failed); RemoteUnavailable
        when no byte of it arrived for the read deadline.  Not a read's wait
        for its own bytes: a part on one slow connection may take longer than
        the deadline while the file steadily arrives, and waiting for all of
        it is what this open asked for.  The blocks that complete the file
        are held until it is verified (lastbytes.py): once every byte is in,
        the wait is the verification's.  Bad bytes start it over: that counts
        as a change, and the wait goes on."""
        deadline = self.fetcher.cfg.read_deadline
        seen, since = -1, trio.current_time()
        while not dl.finished.is_set():
            now, got = trio.current_time(), dl.fetched_bytes
            if got != seen:
                seen, since = got, now
            allowed = verify_deadline(obj, deadline) if got >= obj.size else deadline
            if now - since >= allowed:
                raise RemoteUnavailable(f"{quoted(obj.uri)}: " + (
                    f"not verified within {allowed:.0f} s of its last byte" if got >= obj.size else
                    f"no byte of it arrived for {deadline:g} s ({got} of {obj.size} bytes in)"),
                    bucket=obj.bucket, key=obj.key)
            with trio.move_on_after(min(WHOLE_FILE_LOOK_S, since + allowed - now)):
                await dl.finished.wait()

    async def _following(self, obj: RemoteObject, local: bool, whole: bool) -> RemoteObject | None:
        """The shard to fetch once `obj` is read through (see _read_through).
        None when it is on disk already, if `obj` is too: then nothing needs
        to see this handle's reads, and the kernel may read its copy itself
        (local_copy, passthrough.py).  None too after a whole-file open: the
        kernel will read it, so its next shard is fetched now."""
        following = self.next_shard(obj) if self.fetcher.cfg.model_readahead else None
        if following is None or not local:
            return following
        if whole:
            self._start_next(following, behind=None)
            return None
        try:
            state = await self.fetcher.state_of(following)
        except LazyfsError:
            return following
        return None if state.state.ready else following

    def bytes_were_bad(self, obj: RemoteObject) -> None:
        """Bytes of `obj` failed verification (the download starts over): the
        kernel may have cached pages of them for its inode, which stands for
        the version whatever its bytes.  The kernel is told to drop them
        (kernelcache.drop_pages), but on a thread of its own, not waited for:
        an open meanwhile that kept the cache read the bad bytes again (a
        pinned mount's unapproved ones, once in 20 runs).  So every open of it
        drops them itself (keep_cache off), until one opens a whole copy."""
        self._bad_bytes.add(obj.version)

    def _pages_of_bad_bytes(self, obj: RemoteObject, whole: bool) -> bool:
        if obj.version not in self._bad_bytes:
            return False
        if whole:  # this open drops whatever pages are left; the copy's are its own from then on
            self._bad_bytes.discard(obj.version)
        return True

    def reads_arriving(self, fh: int) -> bool:
        """Does handle `fh` read its file through a download, as the bytes arrive?"""
        of = self._open.get(fh)
        return of is not None and of.download is not None

    def keeps_cache(self, fh: int) -> bool:
        """May the kernel keep the pages it cached for handle `fh`'s inode?"""
        of = self._open.get(fh)
        return of is None or not of.pages_stale

    def local_copy(self, fh: int) -> tuple[int, int] | None:
        """The descriptor and filesystem (st_dev) of handle `fh`'s complete
        local copy, which the kernel may read without lazyfs; None while it
        reads through a download, or while its reads must be seen (a shard
        whose next one is fetched when it is read through)."""
        of = self._open.get(fh)
        return (of.fd, of.dev) if of is not None and of.fmap is not None and of.following is None else None

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        """The bytes, from a mapping whose pages are in the page cache (see
        pagecache.py): the reply copies them on the trio thread.  A failure
        repeating in a tight loop is answered after a pause (repeats.py)."""
        of = self._open.get(fh)
        if of is None:
            raise BadHandle(f"read on unknown file handle {fh}")
        try:
            if of.fmap is not None:
                await self.fetcher.pagecache.ensure(of.fmap, off, size)
                data = of.fmap.read(off, size)
            else:
                data = await self._read_transfer(fh, of, off, size)
        except (LazyfsError, OSError):
            if pause := self._failing.pause(of.obj.version, trio.current_time()):
                await trio.sleep(pause)
            raise
        if self._failing:  # a loop of this file, if any, is over (the usual case: no loop at all, nothing to do)
            self._failing.ended(of.obj.version)
        STATS.served[of.source] += len(data)
        of.served += len(data)
        if of.following is not None and of.served >= of.obj.size * READ_THROUGH:
            self._read_through(of)
        return data

    def _read_through(self, of: OpenFile) -> None:
        """A reader has read most of a shard: it reads the checkpoint through,
        so fetch the next shard before it asks.  Not at the open: a reader
        of one shard (a few tensors of it) would pay for the next with the
        connections and the CPU its own reads need.  Not before the opened
        shard's last requests are on the wire, for the same reason
        (Fetcher.warm_after); its local copy needs no wait."""
        following, of.following = of.following, None
        assert following is not None
        self._start_next(following, behind=of.download)

    async def _read_transfer(self, fh: int, of: OpenFile, off: int, size: int) -> memoryview:
        dl = of.download
        assert dl is not None
        while True:
            self._refuse_stale(of, dl)
            if not dl.complete:
                await dl.wait_range(off, off + size)
                if not (dl.complete or dl.covered(off, min(off + size, of.obj.size))):
                    continue  # the file started over (bad bytes): its old mapping is closed
            fmap = dl.fmap
            await self.fetcher.pagecache.ensure(fmap, off, min(size, max(0, of.obj.size - off)))
            if self._open.get(fh) is not of:  # released while it waited: its mapping may be gone
                raise BadHandle(f"read on file handle {fh}, released while the read waited")
            # Unless the download started over meanwhile (bad bytes): then wait again.
            if dl.fmap is fmap and (dl.complete or dl.covered(off, min(off + size, of.obj.size))):
                self._refuse_stale(of, dl)
                of.generation = dl.generation
                return fmap.read(off, size)

    @staticmethod
    def _refuse_stale(of: OpenFile, dl: Transfer) -> None:
        """EIO for a handle served bytes that then failed verification (lastbytes.py)."""
        try:
            refuse_stale_generation(of.obj, of.served, of.generation, dl.generation)
        except ServedBadBytes:
            of.generation = REFUSED
            raise

    def _announce(self, obj: RemoteObject, copy: LocalCopy) -> None:
        """One log line per file and process saying where its bytes come from."""
        ident = (obj.key, obj.etag, copy.state)
        if ident in self._announced:
            return
        self._announced[ident] = True
        log.info("serving %s from the %s copy in the %s (%d bytes, no download)", quoted(obj.uri), copy.state,
                 copy.layer.label, obj.size, extra={"event": "local", "key": obj.key, "bytes": obj.size,
                                                    "source": copy.state})

    def release(self, fh: int) -> None:
        of = self._open.pop(fh, None)
        if of is None:
            return
        budget = self.fetcher.budget
        if budget is not None:
            budget.unuse(of.obj.key)
        if of.download is not None:
            of.download.drop_reader()
            if isinstance(of.download, Download) and budget is not None and not budget.in_use(of.obj.key):
                stop_unread(self.fetcher.runner, of.download)  # (if not kept: a file larger than the budget)
        else:
            assert of.fmap is not None
            of.fmap.close()
            # The last link of an evicted or replaced file: closing it frees
            # its blocks, which for a large file takes long; not on this thread.
            self.fetcher.close_fd(of.fd)

    def release_inode(self, ino: int) -> int:
        """The kernel forgot inode `ino`, so it holds no open file of it: any
        handle still here is one whose open reply never reached it (the
        opener was interrupted).  Release them; how many there were."""
        leaked = [fh for fh, of in self._open.items() if of.ino == ino and ino]
        for fh in leaked:
            log.warning("releasing handle %d of %s: its open never reached the kernel", fh,
                        quoted(self._open[fh].obj.uri))
            self.release(fh)
        return len(leaked)

    def close_all(self) -> None:
        for fh in list(self._open):
            self.release(fh)
