"""Work done alongside a download while its blocks arrive: reading a
safetensors header to fetch in loader order (modelaware.py), and hashing the
file as it fills from the start, so verification ends with the last byte
(or, for a CRC, combining the sums of its pieces taken as they were written:
piecesums.py).
Both are trio tasks of the engine; their blocking parts run in threads and
write no trio-side state (docs/concurrency.md)."""

from __future__ import annotations

import functools
import logging
from typing import Callable

import trio

from lazyfs import completion, modelaware, piecesums, verify
from lazyfs.completion import expectation, hash_more_blocking, lower_priority
from lazyfs.download import Download
from lazyfs.errors import AccessDenied, ObjectChanged, ObjectNotFound, RemoteUnavailable
from lazyfs.objectstore import ObjectStore
from lazyfs.partials import Partial
from lazyfs.piecesums import PieceSums
from lazyfs.threads import run_sync
from lazyfs.verify import Digest, Expectation, Hashed
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

# How many parts ahead of the first one not yet hashed may be hashed out of order (_hash_parts).
PARTS_AHEAD = 16


async def learn_order(dl: Download, poke: Callable[[], None]) -> None:
    """Read a safetensors file's header as soon as it is on disk and sweep in
    the order loaders read tensors."""
    partial = dl.partial
    total = modelaware.header_size(bytes(dl.fmap.read(0, 8)))
    if total is None or total > dl.obj.size:
        return
    while dl.contiguous < total and not dl.cancelled and dl.partial is partial:
        await dl.progressed.wait()
    if dl.cancelled or dl.partial is not partial:
        return
    header = bytes(dl.fmap.read(0, total))
    order = await run_sync(modelaware.loader_order, header, dl.obj.size, dl.block_size)
    if order is not None and dl.partial is partial:
        dl.follow_order(order)
        poke()


async def hash_along(dl: Download, remote: ObjectStore, requests: trio.CapacityLimiter,
                     hashing: trio.CapacityLimiter) -> None:
    """Keep `dl.digest` up to date with the contiguous prefix on disk; set
    `dl.hashed` when it is complete or given up.  Any trouble here just
    leaves the whole check to the end (Runner.finish)."""
    partial = dl.partial
    try:
        early = _asks_with_the_first_get(dl)
        asked, exp = await _asked_at_once(dl, remote, requests) if early else (False, None)
        if not asked:
            while dl.meta is None and not dl.all_done and not dl.cancelled:
                await dl.progressed.wait()  # the first response says what to check against
            if dl.cancelled:
                return
            exp = await run_sync(expectation, remote, dl.obj, dl.meta, not early, limiter=requests)
        if dl.sums.start(piecesums.algorithm_of(exp) if exp else ""):  # (and a sum of no use stops)
            assert exp is not None
            await _sum_up(dl, partial, exp, hashing)
            return
        if exp is None:
            return
        if exp.per_part and len(exp.part_sizes) > 1:
            await _hash_parts(dl, partial, exp, hashing)
            return
        digest = Digest(exp)
        while not dl.cancelled and dl.partial is partial:
            end = dl.contiguous
            if end > digest.fed:
                with dl.pin():
                    hash_more = functools.partial(hash_more_blocking, dl.fd, digest.fed, end, digest,
                                                  lambda: dl.cancelled)
                    await run_sync(hash_more, limiter=hashing)
            if digest.fed >= dl.obj.size:
                if dl.partial is partial:
                    dl.digest = digest.result()
                return
            if dl.contiguous <= digest.fed:
                await dl.progressed.wait()
    except Exception as e:
        log.debug("%s: hashing along stopped: %s", quoted(dl.obj.uri), e)
    finally:
        if dl.partial is partial:
            dl.hashed.set()


async def _hash_parts(dl: Download, partial: Partial, exp: Expectation, hashing: trio.CapacityLimiter) -> None:
    """A multipart ETag (or a composite of SHAs) is a hash per part: each part
    is hashed as soon as all its bytes are on disk, in whatever order they
    came and on as many threads as `hashing` allows.  In file order, a part
    that arrived early waited for every part before it, and one hash thread
    (MD5: ~0.7 GB/s a core) ran behind a faster download, holding the
    file's last blocks from its readers until it caught up (lastbytes.py);
    this way the last byte leaves only its own part to hash.  Only the
    first PARTS_AHEAD parts not yet hashed are looked at on each landing, so
    a file of 10,000 parts costs the trio thread no scan of them all each
    time (the sweep brings parts in nearly in order)."""
    ranges = verify.part_ranges(exp)
    digests: list[bytes | None] = [None] * len(ranges)
    waiting = list(range(len(ranges)))  # in file order
    running = 0
    look = trio.Event()  # set when blocks land or a part's hash ends: look for parts to hash

    async def hash_part(i: int) -> None:
        nonlocal running
        with dl.pin():
            part = functools.partial(verify.part_digest, dl.fd, *ranges[i], exp, lambda: dl.cancelled)
            digests[i] = await run_sync(part, limiter=hashing)
        running -= 1
        look.set()

    async def watch_landings() -> None:
        while not dl.finished.is_set():  # (progressed stays set once the download is over)
            await dl.progressed.wait()
            look.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_landings)
        while (waiting or running) and not dl.cancelled and dl.partial is partial:
            look = trio.Event()
            room = hashing.total_tokens - running  # no queue of parts in front of other files' hashes
            for i in [i for i in waiting[:PARTS_AHEAD] if dl.covered(*ranges[i], held=True)][:max(0, int(room))]:
                waiting.remove(i)
                running += 1
                nursery.start_soon(hash_part, i)
            await look.wait()
        nursery.cancel_scope.cancel()
    if dl.partial is partial and all(d is not None for d in digests):
        dl.digest = Hashed(exp, dl.obj.size, verify.composite_value(exp, [d for d in digests if d is not None]))


def _asks_with_the_first_get(dl: Download) -> bool:
    """Whether to send, with the first GET, the HEAD verification sends
    anyway: a big file (completion.ASK_FOR_A_CHECKSUM_FROM) whose listing
    names no checksum and which no single GET covers whole (ranged
    responses carry none), fetched in the background (a prefetch, a
    checkpoint's next shard).  Not for an open: beside the first GET it
    delayed the reader's first bytes (45.0 against 42.0 ms, the median of
    9 first 4 KiB in emulated S3); its HEAD goes once the first response is
    in."""
    obj = dl.obj
    return (dl.background and not obj.checksum_algorithm and obj.size >= completion.ASK_FOR_A_CHECKSUM_FROM
            and obj.size > dl.block_size * dl.limits.part_blocks)


async def _asked_at_once(dl: Download, remote: ObjectStore,
                         requests: trio.CapacityLimiter) -> tuple[bool, Expectation | None]:
    """Send that HEAD with the first GET instead of after its answer: the
    checksum it names (a store that keeps a CRC but lists none, as SeaweedFS)
    then reaches `dl.sums` before the pieces that would otherwise be read
    back to verify.  (Whether it was answered, what to check against.)  When
    it failed, the first response's ETag decides, with no second HEAD (a
    replaced object too: GETs with If-Match fail if it was replaced before
    them, and bytes they fetched are this version's)."""
    try:
        return True, await run_sync(expectation, remote, dl.obj, None, limiter=requests)
    except (RemoteUnavailable, AccessDenied, ObjectChanged, ObjectNotFound) as e:
        completion.no_checksum_asked(dl.obj, e)
        return False, None


async def _sum_up(dl: Download, partial: Partial, exp: Expectation, hashing: trio.CapacityLimiter) -> None:
    """Once every block is in, combine the pieces' CRCs (and read back what
    they do not cover: piecesums.py) into `dl.digest`."""
    sums = dl.sums
    while not dl.all_done and not dl.cancelled and dl.partial is partial:
        await dl.progressed.wait()
    if dl.cancelled or dl.partial is not partial:
        return
    with dl.pin():
        sum_up = functools.partial(_hashed_blocking, sums, dl.fd, exp, lambda: dl.cancelled)
        hashed = await run_sync(sum_up, limiter=hashing)
    if hashed is not None and dl.partial is partial:
        dl.digest = hashed


def _hashed_blocking(sums: PieceSums, fd: int, exp: Expectation, cancelled: Callable[[], bool]) -> Hashed | None:
    with lower_priority():  # what no sum covers is read back: it can wait, a loader should not
        return sums.hashed(fd, exp, cancelled)
