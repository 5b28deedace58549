"""One object version being fetched by this process: which bytes are on disk,
which are on their way, and who is waiting for what.

The file is tracked in fixed *blocks* (1 MiB, or the part size if smaller);
bytes travel in *requests* (ranged GETs) covering runs of pending blocks: up
to a *part* (`--part-size`) for the sequential sweep, just the blocks a reader
waits for when it jumps ahead (an mmap-driven loader touching scattered
tensors fetches those tensors, not a whole part around each).

Everything here runs on the trio thread (docs/concurrency.md).  A Download
knows nothing of the engine that drives it: it gets plain values and two
callbacks when it is made.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Callable

import trio

from lazyfs.errors import again
from lazyfs.filemap import FileMap, PageBudget
from lazyfs.gaveup import GaveUp
from lazyfs.lastbytes import verify_deadline
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import ResponseMeta
from lazyfs.partials import Partial
from lazyfs.partpace import Attempt, Limits, PartPace, Wire
from lazyfs.piecesums import PieceSums
from lazyfs.pin import Pin
from lazyfs.storewrite import WriteTurns
from lazyfs.verify import Hashed

PENDING, ACTIVE, DONE = 0, 1, 2
# Partial.done_map (1: on disk) as block states.
_AS_STATE = bytes([PENDING, DONE]) + bytes(254)
# A waiting reader's requests: at most this many blocks (what it needs, a little readahead).
DEMAND_BLOCKS = 2
# The most blocks a follower's want demands (a FUSE read is 1 MiB at most; no more is trusted).
WANT_MAX_BLOCKS = 16
# Block completions are made durable (fdatasync + resume record) at most this often;
# every RECORD_FOLLOWED_S for FOLLOWED_S after a want (followers see what it names).
RECORD_EVERY_S = 1.0
RECORD_FOLLOWED_S = 0.2
FOLLOWED_S = 3.0


class Request:
    """One ranged GET in flight: bytes [start, end), `filled` of them on disk."""

    __slots__ = ("attempt", "end", "filled", "first_block", "next_block", "start")

    def __init__(self, start: int, end: int, first_block: int, attempt: Attempt) -> None:
        self.start = start
        self.end = end
        self.filled = 0
        self.first_block = first_block
        self.next_block = first_block  # the first block not yet DONE
        self.attempt = attempt  # when its attempt under way began: what the pace measures (partpace.py)


class Download:
    def __init__(self, obj: RemoteObject, partial: Partial, limits: Limits, pages: PageBudget, *,
                 background: bool, keep: bool = True, on_work: Callable[[], None] = lambda: None,
                 on_closed: Callable[[Partial], None] = lambda p: None,
                 close_fd: Callable[[int], None] = os.close, wire: Wire | None = None) -> None:
        self.obj = obj
        self.limits = limits
        self.pages = pages
        self.background = background
        self.keep = keep  # False: larger than the cache budget; served, then thrown away
        self._on_work = on_work  # bytes are wanted: the dispatcher should look
        self._on_closed = on_closed  # the descriptor is closed: the files may go
        self._close_fd = close_fd  # off the trio thread when it is an unlinked file's last link
        self.readers = 0
        self.served = 0  # of them, handles whose reads lazyfs answers as the file fills (storewrite.py)
        self.started = time.monotonic()
        self.error: BaseException | None = None
        self.complete = False  # verified and published
        self.finished = trio.Event()  # complete or failed
        self.cancelled = False  # read by worker threads: stop at the next piece
        self.pins = 0  # Pin objects holding `fd` open
        self.bytes_fetched = 0
        self.verify_attempts = 0
        self.changing: trio.Event | None = None  # the object changed in the store; set once the mount knows
        self.wants_order = False  # a safetensors file whose header has not been looked at yet (modelaware.py)
        self.verified = ""  # how the published bytes were checked (completion.check), or "unverified"
        # What the bytes hashed to, once hashed along (alongside.hash_along): verification ends with the last byte.
        self.digest: Hashed | None = None
        self.hashed = trio.Event()  # the hashing along is over (digest complete, or given up)
        self.meta: ResponseMeta | None = None  # verification hints from a GET's headers
        self.lock_fd = -1  # the store lock that makes this process the version's one downloader
        self.state_saved_at = 0.0
        self.saving = False  # a save of the resume record is scheduled
        self.wants_read = 0  # how far the want file of followers (coop.py) is read
        self.followed_until = 0.0  # time.monotonic() until which followers are known to wait
        self._fd_closed = False
        self.generation = 1  # attempts at the file; bytes of an earlier one failed (lastbytes.py)
        self.waiters: list[tuple[int, int, trio.Event]] = []  # readers, also across a start-over
        # Blocks per sweep request: it learns the link's rate (`wire`: the process's requests, every download's).
        self.pace = PartPace(limits, partial.block_size, wire or Wire(), lambda: self.obj.size - self.done_bytes)
        self.attach(partial)

    def attach(self, partial: Partial) -> None:
        """Download into `partial` (a fresh one after a failed verification)."""
        self.partial = partial
        self.bad = False  # its bytes failed verification (disown)
        self.digest = None
        self.sums = PieceSums(partial.obj.size, partial.obj.checksum_algorithm)  # from the first piece if listed
        self.hashed = trio.Event()
        self.finishing = False  # Runner.finish is on its way for this file
        self.fd = partial.fd
        self.write_turns = WriteTurns(separate=partial.preallocated)  # storewrite.py
        self.gave_up = GaveUp(self.limits.read_deadline)  # blocks readers waited for in vain (gaveup.py)
        self._fmap = FileMap(partial.fd, partial.obj.size, self.pages)
        self.block_size = partial.block_size
        self.nblocks = partial.nblocks
        # No loop over the blocks here (issue 11 #13): the map was made by the
        # store thread that opened the file, and the bytes follow from the count.
        self.ndone = len(partial.done)
        if partial.done_map.count(1) == self.ndone:
            self.state = partial.done_map.translate(_AS_STATE)
        else:  # `done` grew since the file was opened (not on the engine's paths)
            self.state = bytearray(self.nblocks)
            for i in partial.done:
                self.state[i] = DONE
        # The blocks that completed it, until it is verified (lastbytes.py): all, if it came complete.
        self.held = frozenset(range(self.nblocks)) if self.ndone == self.nblocks else frozenset[int]()
        self.done_bytes = self.ndone * self.block_size
        if self.nblocks - 1 in partial.done:  # the last block may be short
            self.done_bytes -= self.nblocks * self.block_size - self.obj.size
        self._prefix = 0  # blocks [0, _prefix) are DONE
        self.progressed = trio.Event()  # set (and replaced) whenever blocks land
        self.detached = False
        self.owner: dict[int, Request] = {}  # ACTIVE block -> its request
        self.requests: set[Request] = set()
        self.demand: deque[int] = deque()
        self.sweep = 0
        # The sweep's order of blocks when not the file's (modelaware.loader_order), and how far along it is.
        self.order: list[int] | None = None
        self._order_pos = 0
        # Slow start: one request until the first bytes arrive (the first read does not share the server).
        self.ramp = 1
        for start, end, _ in self.waiters:  # readers waiting through a start-over go first again
            self._demand(start, end)

    @property
    def fmap(self) -> FileMap:
        return self._fmap

    @property
    def fetched_bytes(self) -> int:
        if self.complete:
            return self.obj.size
        # A copy of the set: the metrics thread reads this too (docs/concurrency.md).
        partly = sum(r.start + r.filled - r.next_block * self.block_size for r in tuple(self.requests)
                     if r.start + r.filled > r.next_block * self.block_size)
        return self.done_bytes + partly

    @property
    def contiguous(self) -> int:
        """Bytes [0, contiguous) are on disk."""
        while self._prefix < self.nblocks and self.state[self._prefix] == DONE:
            self._prefix += 1
        return self.obj.size if self._prefix >= self.nblocks else self._prefix * self.block_size

    def block_end(self, i: int) -> int:
        return min(self.obj.size, (i + 1) * self.block_size)

    def pin(self) -> Pin:
        return Pin(self)

    # -- readers -------------------------------------------------------------

    def covered(self, start: int, end: int, held: bool = False) -> bool:
        """Are bytes [start, end) on disk (`held`: counting blocks held from readers until verified)?"""
        if self.complete or end <= start:
            return True
        if self.bad:
            return False
        for i in range(start // self.block_size, (end - 1) // self.block_size + 1):
            st = self.state[i]
            if st == DONE and (held or i not in self.held):
                continue
            if st == ACTIVE:
                req = self.owner[i]
                if req.start + req.filled >= min(end, self.block_end(i)):
                    continue
            return False
        return True

    async def wait_drained(self) -> None:
        """Return once every block is on disk or on its way, or the download is over."""
        while not self.finished.is_set() and (self.detached or PENDING in self.state):
            # Blocks are claimed between landings: a landing is when to look again (a failure lands nothing).
            with trio.move_on_after(0.5):
                await self.progressed.wait()

    async def wait_range(self, start: int, end: int) -> None:
        """Return once [start, end) is on disk, or the file started over
        (the caller looks again); jump the queue for it."""
        end = min(end, self.obj.size)
        if self.error is not None:
            raise again(self.error)
        if self.covered(start, end):
            return
        self._demand(start, end)
        event = trio.Event()
        self.waiters.append((start, end, event))
        self._on_work()
        bs = self.block_size  # what the reader did not get is marked block by block (see progress)
        # All on disk but held: the wait is the verification's.
        deadline = verify_deadline(self.obj, self.gave_up.deadline) if self.all_done else None
        try:
            await self.gave_up.wait(event, self.obj, start, end, lambda: [(i * bs, self.block_end(i)) for i in
                                    range(start // bs, (end - 1) // bs + 1) if self.state[i] != DONE], deadline)
        finally:
            self.waiters = [w for w in self.waiters if w[2] is not event]
        if self.error is not None:
            raise again(self.error)

    def want(self, start: int, end: int) -> bool:
        """Readers in another process following this download (coop.py) wait for bytes
        [start, end): demand their pending blocks as if a reader here waited.  Whether any was pending."""
        # They see blocks only once the resume record names them: record more often meanwhile.
        self.followed_until = time.monotonic() + FOLLOWED_S
        end = min(end, self.obj.size, start + WANT_MAX_BLOCKS * self.block_size)
        if self.detached or start >= end or start < 0:
            return False
        return self._demand(start, end)

    def _demand(self, start: int, end: int) -> bool:
        """Queue the pending blocks of [start, end) next (each once); whether any was."""
        added = False
        for i in range(start // self.block_size, (end - 1) // self.block_size + 1):
            if self.state[i] == PENDING and i not in self.demand:
                self.demand.append(i)
                added = True
        return added

    def record_every(self) -> float:
        """Seconds between saves of the resume record (less while followers wait: they read it)."""
        return RECORD_FOLLOWED_S if time.monotonic() < self.followed_until else RECORD_EVERY_S

    def wake(self) -> None:
        if not self.waiters:
            return
        keep = []
        for w in self.waiters:
            if self.error is not None or self.covered(w[0], w[1]):
                w[2].set()
            else:
                keep.append(w)
        self.waiters = keep

    def add_reader(self, served: bool = True) -> None:
        self.readers += 1
        self.served += served

    def drop_reader(self, served: bool = True) -> None:
        self.readers -= 1
        self.served -= served
        self.maybe_close_fd()

    # -- scheduling -------------------------------------------------------------

    def next_request(self, demanded_only: bool = False) -> Request | None:
        """The next run of pending blocks to fetch, marked ACTIVE; None if none
        is due (nothing pending, or the slow start holds the sweep back)."""
        if self.detached:
            return None
        while self.demand:
            i = self.demand.popleft()
            if self.state[i] == PENDING:
                return self._claim(i, 1 if self.limits.whole_parts else min(DEMAND_BLOCKS, self.limits.part_blocks))
        if demanded_only or len(self.requests) >= self.ramp:
            return None
        if self.order is not None:
            return self._next_in_order()
        while self.sweep < self.nblocks and self.state[self.sweep] != PENDING:
            self.sweep += 1
        if self.sweep >= self.nblocks:
            return None
        first = self.limits.whole_parts and self.sweep == 0  # the header a reader opened the file for
        return self._claim(self.sweep, 1 if first else self.pace.blocks)

    def follow_order(self, order: list[int]) -> None:
        """Sweep the blocks in this order from now on (each block once)."""
        self.order, self._order_pos = order, 0

    def _next_in_order(self) -> Request | None:
        order = self.order
        assert order is not None
        while self._order_pos < len(order) and self.state[order[self._order_pos]] != PENDING:
            self._order_pos += 1
        if self._order_pos >= len(order):
            return None
        first = order[self._order_pos]
        run = 1  # as long as the order and the file agree, one request takes them together
        while run < self.pace.blocks and self._order_pos + run < len(order) and \
                order[self._order_pos + run] == first + run:
            run += 1
        return self._claim(first, run)

    def _claim(self, first: int, max_blocks: int) -> Request:
        last = first
        while last < self.nblocks and last - first < max_blocks and self.state[last] == PENDING:
            last += 1
        req = Request(start := first * self.block_size, self.block_end(last - 1), first, self.pace.stamp(start))
        for i in range(first, last):
            self.state[i] = ACTIVE
            self.owner[i] = req
        self.requests.add(req)
        return req

    def progress(self, req: Request, filled: int) -> list[int]:
        """Bytes [req.start, req.start + filled) are on disk: blocks they
        complete become DONE (returned, for the resume record)."""
        if req not in self.requests:
            return []
        if req.filled == 0 and filled > 0:
            self.ramp = self.limits.max_requests
        if self.gave_up and filled > req.filled:  # readers wait again for a stalled block only if
            # no bytes arrived for it: on its request, or on any while it waits for one (gaveup.py)
            self.gave_up.drop(lambda s, e: self.owner.get(s // self.block_size, req) is not req)
        req.filled = filled
        self._fmap.mark_warm(req.start, req.start + filled)  # just written: in the page cache
        done = []
        while req.next_block * self.block_size < req.end and \
                self.block_end(req.next_block) <= req.start + filled:
            i = req.next_block
            self.state[i] = DONE
            del self.owner[i]
            self.ndone += 1
            self.done_bytes += self.block_end(i) - i * self.block_size
            done.append(i)
            req.next_block += 1
        if req.start + filled >= req.end:
            self.requests.discard(req)
            self.pace.landed(req)
        if done and self.ndone == self.nblocks:
            self.held = frozenset(done)  # this landing completed the file: held until it is verified
        if done:
            self.progressed.set()
            self.progressed = trio.Event()
        self.wake()
        return done

    def abandon(self, req: Request) -> None:
        """A request failed: its blocks not yet on disk are pending again."""
        self.requests.discard(req)
        i = req.next_block
        while i < self.nblocks and self.owner.get(i) is req:
            self.state[i] = PENDING
            del self.owner[i]
            i += 1
        self.sweep = min(self.sweep, req.next_block)

    def mark_all_done(self) -> None:
        """Every block is on disk (an empty object, or a resume that had them all)."""
        self.state[:] = bytes([DONE]) * self.nblocks
        self.held = frozenset(range(self.nblocks))  # none of them was verified yet
        self.progressed.set()
        self.ndone = self.nblocks
        self.done_bytes = self.obj.size

    @property
    def all_done(self) -> bool:
        return self.ndone == self.nblocks

    def detach(self) -> None:
        """Let go of the current file before a fresh one is attached (after a
        failed verification), so its blocks are freed as soon as it is
        unlinked: every block is pending again, nothing is fetched and readers
        wait until `attach`.  Only with no pin held."""
        assert self.pins == 0, "detach while a thread uses the file"
        self.state = bytearray(self.nblocks)
        self.ndone = self.done_bytes = self.sweep = self._prefix = 0
        self.owner.clear()
        self.requests.clear()
        self.demand.clear()
        self.detached = True
        self._fmap.close()
        os.close(self.fd)
        self.fd = -1

    def disown(self) -> None:
        """Its bytes failed verification: none is served from now on, and a
        reader that was served some reads on no more (lastbytes.py)."""
        self.bad = True
        self.generation += 1
        for _, _, event in self.waiters:
            event.set()  # each reader looks again

    def maybe_close_fd(self) -> None:
        """Close the descriptor once nothing can use it again: finished, no pin,
        no reader.  Trio thread only, like every read of the mapping."""
        if self.finished.is_set() and self.pins == 0 and self.readers <= 0 and not self._fd_closed:
            self._fd_closed = True
            if self.fd >= 0:
                self._fmap.close()
                self._close_fd(self.fd)
            if not self.keep:
                self._on_closed(self.partial)
