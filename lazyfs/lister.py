"""Listing one S3 folder completely, with few requests.

A folder is listed flat (no delimiter: up to 1000 keys a request however
deep they nest), in a few key ranges at once.  A range holds the keys k with
`after < k <= upto`; consecutive ranges share their bound, so together they
cover the folder's key space exactly: no gap, and no key kept twice, even
when a page runs past its range's end (what lies beyond is dropped, and the
next range lists it).

Where the ranges split:
- after a listing, at evenly spaced keys of it, each range a whole number of
  pages (`plan_splits`): the next listing of an unchanged folder costs
  exactly ceil(keys / 1000) requests, in up to MAX_RANGES parallel walks;
- the first time, as one range; if its first page is not the whole folder,
  the folder's tree is looked at by delimiter (its first page of subfolders,
  and of theirs while they are fewer than the ranges wanted, a few requests)
  and the rest of the range is split among those folders.

Every request is retried on its own, from the page it asked for, so one
throttled request out of hundreds costs a retry, not the listing.  Requests
run in worker threads under the caller's limiter: a listing never holds more
connections or threads than that, and never those of anything else.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import trio

from lazyfs import listanswers
from lazyfs.errors import RemoteError, RemoteUnavailable
from lazyfs.modeljson import Source
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import ListPage, ObjectStore
from lazyfs.stats import STATS
from lazyfs.threads import run_sync

log = logging.getLogger(__name__)

# Keys a listing request returns at most (S3's limit).
PAGE_KEYS = 1000
# Parallel walks of one folder: enough to hide the round trips of a long
# listing, few enough that a refresh never crowds out the data path.
MAX_RANGES = 8
# A new range for every this many keys of the last listing: below it the
# parallelism would save less than the requests it adds.
KEYS_PER_RANGE = 5000
# Levels of subfolders looked at by delimiter to split a first listing, and
# the pages each of its ranges should have (fewer than KEYS_PER_RANGE: a
# first listing is what a mount waits for; a refresh is not).
DISCOVERY_LEVELS = 2
FIRST_PAGES_PER_RANGE = 2
# Attempts of one listing request before the listing fails.  Each attempt is
# botocore's retries already (about 15 s of backoff by default), so a few
# more ride out a burst of throttling without making a real outage last
# much longer.  The waits between them double from RETRY_BASE_S.
PAGE_ATTEMPTS = 3
RETRY_BASE_S = 0.25


@dataclass(eq=False)
class KeyRange:
    """Keys k with after < k <= upto ("" and None: the folder's ends), and
    the walk through them: `after` moves on as pages arrive."""

    after: str = ""
    upto: str | None = None
    objects: list[RemoteObject] = field(default_factory=list)
    token: str | None = None
    tokens: set[str] = field(default_factory=set)  # given in this walk (a store that repeats one loops)
    pages: int = 0
    done: bool = False
    ignored_start_after: bool = False
    paged: trio.Event = field(default_factory=trio.Event)  # set at the first page

    def take(self, page: ListPage) -> None:
        """Keep the page's keys that fall in this range; done at the range's
        end or the folder's.  Runs on the trio thread, after the request, so
        a bound moved by a split while the page was in flight still holds."""
        objects = page.objects
        if self.pages == 0 and self.after and objects and objects[0].key <= self.after:
            self.ignored_start_after = True  # the store listed from the start
            objects = [o for o in objects if o.key > self.after]
        self.pages += 1
        if self.upto is not None and objects and objects[-1].key >= self.upto:
            keys = [o.key for o in objects]
            objects = objects[:bisect.bisect_right(keys, self.upto)]
            self.done = True
        self.objects.extend(objects)
        if objects:
            self.after = objects[-1].key
        self.token = page.next_token
        if page.next_token is None:
            self.done = True
        self.paged.set()


def plan_splits(objects: Sequence[RemoteObject]) -> list[str]:
    """Bounds that cut a listing of these (sorted) objects into ranges of
    whole pages, one per KEYS_PER_RANGE keys, at most MAX_RANGES."""
    n = len(objects)
    count = min(MAX_RANGES, -(-n // KEYS_PER_RANGE))
    if count <= 1:
        return []
    per = -(-n // count)
    per = -(-per // PAGE_KEYS) * PAGE_KEYS
    return [objects[i - 1].key for i in range(per, n, per)]


def ranges_for(pages: int, reached: int, ahead: int) -> int:
    """How many ranges the rest of a first listing is worth: `pages` pages
    reached `reached` folders of a level, and `ahead` more lie ahead, so about
    pages * ahead / reached pages are left; a range for every
    FIRST_PAGES_PER_RANGE of them (all MAX_RANGES when there is no telling)."""
    if reached == 0:
        return MAX_RANGES
    left = pages * ahead / reached
    return max(1, min(MAX_RANGES, math.ceil(left / FIRST_PAGES_PER_RANGE)))


def ranges_from(splits: Sequence[str]) -> list[KeyRange]:
    bounds = ["", *splits, None]
    return [KeyRange(after=str(bounds[i]), upto=bounds[i + 1]) for i in range(len(bounds) - 1)]


def split(r: KeyRange, candidates: Sequence[str], most: int = MAX_RANGES) -> list[KeyRange]:
    """Cut what `r` has not listed yet at up to `most` - 1 of the sorted
    `candidates`, evenly spaced: `r` keeps the first piece, the new ranges
    (returned in key order) the others."""
    inside = [c for c in candidates if c > r.after and (r.upto is None or c < r.upto)]
    if len(inside) > most - 1:
        step = len(inside) / most
        inside = sorted({inside[int(step * (i + 1))] for i in range(most - 1)})
    if not inside:
        return []
    bounds: list[str | None] = [*inside, r.upto]
    r.upto = inside[0]
    return [KeyRange(after=str(bounds[i]), upto=bounds[i + 1]) for i in range(len(inside))]


class Lister:
    """Lists folders of one object store; remembers where each folder's
    last listing split, for the next one."""

    def __init__(self, remote: ObjectStore, limiter: trio.CapacityLimiter,
                 turn: Callable[[], Awaitable[None]] | None = None) -> None:
        self.remote = remote
        self.limiter = limiter
        # Awaited before each request: when it may go (catalog: readers first).
        self.turn = turn
        self._splits: dict[Source, list[str]] = {}
        # Set once the store shows it ignores StartAfter: then one walk a folder.
        self.flat_only = False

    async def list_folder(self, source: Source) -> list[RemoteObject]:
        """Every object under the folder, in key order (RemoteError if a
        request keeps failing)."""
        planned = source in self._splits and not self.flat_only
        ranges = ranges_from(self._splits.get(source, ())) if planned else [KeyRange()]
        await _together([functools.partial(self._walk, source, r) for r in ranges] +
                        ([] if planned else [functools.partial(self._split_when_long, source, ranges)]))
        if any(r.ignored_start_after for r in ranges) and not self.flat_only:
            self.flat_only = True
            log.warning("%s: the object store ignores StartAfter; listing each folder in one walk", source)
        objects, splits = await run_sync(_joined, ranges)
        self._splits[source] = splits
        return objects

    async def _walk(self, source: Source, r: KeyRange) -> None:
        last = ""  # the last key the store listed in this walk
        while not r.done:
            page = await self.request(source.bucket, source.prefix, start_after=r.after, token=r.token)
            listanswers.looping(source.bucket, source.prefix, page.next_token, r.tokens, last,
                                page.objects[-1].key if page.objects else None)
            if page.next_token is not None:
                r.tokens.add(page.next_token)
            last = page.objects[-1].key if page.objects else last
            r.take(page)

    async def _split_when_long(self, source: Source, ranges: list[KeyRange]) -> None:
        """A first listing: once the single walk's first page shows the folder
        is longer than a page, split the rest among its folders, into as many
        ranges as the rest looks long."""
        first = ranges[0]
        await first.paged.wait()
        if first.done or self.flat_only:
            return
        past, pages = first.after, first.pages
        candidates, reached, ahead = await self._folders_past(source, past)
        new = split(first, candidates, most=ranges_for(pages, reached, ahead))
        ranges.extend(new)
        await _together([functools.partial(self._walk, source, r) for r in new])

    async def _folders_past(self, source: Source, past: str) -> tuple[list[str], int, int]:
        """Folders (and subfolders while they are few) that sort after `past`:
        bounds to split the rest of a listing at; and of the deepest level
        looked at, how many folders the walk has reached and how many lie
        ahead.  Only first pages of delimiter listings: a few requests,
        however big the folder."""
        level: list[str] = [source.prefix]
        found: set[str] = set()
        reached = ahead = 0
        for _ in range(DISCOVERY_LEVELS):
            pages: list[ListPage] = []
            await _together([functools.partial(self._first_page_of, source.bucket, f, pages) for f in level])
            folders = sorted({f for p in pages for f in p.folders})
            beyond = [f for f in folders if f > past]
            found.update(beyond)
            if folders:  # a level of leaf folders tells nothing new
                ahead, reached = len(beyond), len(folders) - len(beyond)
            if len(found) >= MAX_RANGES - 1 or any(p.truncated for p in pages):
                break
            level = [f for f in folders if f > past or past.startswith(f)]
            if not level:
                break
        return sorted(found), reached, ahead

    async def _first_page_of(self, bucket: str, folder: str, out: list[ListPage]) -> None:
        out.append(await self.request(bucket, folder, delimiter=True))

    async def request(self, bucket: str, prefix: str, *, delimiter: bool = False, start_after: str = "",
                      token: str | None = None, max_keys: int = PAGE_KEYS) -> ListPage:
        """One listing request in a worker thread, tried again (with backoff
        and jitter) while the store answers that it is unavailable or
        throttling.  The thread only returns a value, so a cancelled listing
        abandons it."""
        call = functools.partial(self.remote.list_page, bucket, prefix, delimiter=delimiter,
                                 start_after=start_after, token=token, max_keys=max_keys)
        for attempt in range(1, PAGE_ATTEMPTS + 1):
            if self.turn is not None:
                await self.turn()
            try:
                return await run_sync(call, limiter=self.limiter, abandon_on_cancel=True)
            except RemoteUnavailable as e:
                if attempt == PAGE_ATTEMPTS:
                    raise
                wait = RETRY_BASE_S * 2 ** (attempt - 1) * (0.5 + random.random())
                # DEBUG: a request that then succeeds is no failure, and one
                # that keeps failing fails the listing, which logs that.
                log.debug("%s; trying that listing request again in %.1f s", e, wait)
                STATS.bump("retries")
                await trio.sleep(wait)
        raise AssertionError("unreachable")


async def _together(tasks: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run the tasks in parallel; the first RemoteError cancels the others and
    is raised as itself (not in an exception group)."""
    errors: list[RemoteError] = []
    async with trio.open_nursery() as nursery:
        for task in tasks:
            nursery.start_soon(_guarded, task, errors, nursery.cancel_scope)
    if errors:
        raise errors[0]


async def _guarded(task: Callable[[], Awaitable[None]], errors: list[RemoteError], scope: trio.CancelScope) -> None:
    try:
        await task()
    except RemoteError as e:
        errors.append(e)
        scope.cancel()


def _joined(ranges: Sequence[KeyRange]) -> tuple[list[RemoteObject], list[str]]:
    """The ranges' objects in key order (the ranges are in key order, disjoint
    and each sorted), and where the next listing should split.  O(objects):
    a worker thread's."""
    objects = [o for r in ranges for o in r.objects]
    return objects, plan_splits(objects)
