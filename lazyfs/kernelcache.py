"""Telling the kernel to forget what it cached: names a refresh changed, and
pages of a version whose bytes were bad.

The kernel carries out a notification only once no request in flight holds
what it touches: a page drop waits for the reads holding the file's pages, a
name waits for the lookups and listings of its folder, and only the mount can
answer those.  So every notification runs on a thread of its own and starting
one never waits (its caller may be what such a request waits for), and a
stopping mount keeps answering requests until the notifications under way
have ended (`settle`): one left waiting on a request nobody answers keeps
/dev/fuse open inside the kernel, so neither the unmount nor the process's
exit could end that request, and the mount would be dead until its connection
was aborted (`lazyfs umount --force`, or the next start; docs/concurrency.md).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import pyfuse3
import trio

from lazyfs.inodes import InodeRef, InodeTable
from lazyfs.namespace import Diff, RemoteObject
from lazyfs.threads import start_soon
from lazyfs.wording import quoted

log = logging.getLogger(__name__)


class KernelCache:
    """The mount's notifications to the kernel (called on the trio thread)."""

    def __init__(self, inodes: InodeTable) -> None:
        self.inodes = inodes
        self._under_way: set[trio.Event] = set()  # each set when its thread ends
        self._stopping = False

    def forget_names(self, diff: Diff) -> int:
        """Forget the names a refresh changed, so the kernel looks them up
        again (a changed file then gets its new version's inode), and the
        attributes of the folders holding them and of every folder above
        whose date moved (dates and link counts follow their contents), and
        of every file uploaded again with the same bytes (a new date, the
        same inode and pages).  Only names whose meaning changed: a file
        added, removed or replaced, a folder that appeared or vanished.  Never
        the name of a folder that stays a folder: the kernel drops everything
        cached below a name it forgets, so every closed file under it would
        be forgotten, and looked up again as a new inode with no cached pages
        (an unrelated object added beside them cost a re-read of each).
        Names whose folder the kernel never looked up have nothing cached and
        are skipped.  The number of names.

        The inode numbers kept for forgotten versions and folders the refresh
        took away are dropped as well (inodes.py)."""
        gone: list[InodeRef] = [*diff.removed, *(old for old, _ in diff.changed), *diff.folders]
        self.inodes.drop_unlisted(gone)
        names: set[tuple[str, str]] = set()
        for obj in diff.added + diff.removed + tuple(old for old, _ in diff.changed):
            names.add(_split(obj.key))
        names.update(_split(path) for path in diff.folders)
        entries = [(ino, os.fsencode(name)) for parent, name in sorted(names)
                   if (ino := self.inodes.peek(parent)) is not None]
        # Their folders' attributes, and those of every folder above whose date moved (a folder is
        # as new as its newest file anywhere below: `stat` of a grandparent showed the old date).
        redated = (ino for path in diff.redated if (ino := self.inodes.peek(path)) is not None)
        # And a file's own, when only its date moved: it keeps its inode and pages (same bytes), and the
        # inode now stands for the new listing entry; else `stat` showed it older than its folder.
        retouched = (ino for obj in diff.retouched if (ino := self.inodes.renew(obj)) is not None)
        stale = sorted({ino for ino, _ in entries}.union(redated, retouched))
        if entries or stale:
            self._start(functools.partial(_forget_entries, entries, stale))
        return len(entries)

    def drop_pages(self, obj: RemoteObject) -> None:
        """Forget the pages cached for this version."""
        ino = self.inodes.peek(obj)
        if ino is not None:
            self._start(functools.partial(_drop_pages, ino, obj.uri))

    async def settle(self) -> None:
        """Stopping: start no more notifications and wait for those under way.
        Call it while the main loop still answers requests."""
        self._stopping = True
        for done in list(self._under_way):
            await done.wait()

    def _start(self, notify: Callable[[], None]) -> None:
        if self._stopping:
            return
        done = trio.Event()
        self._under_way.add(done)
        token = trio.lowlevel.current_trio_token()

        def ended(_: Any) -> None:  # on the notification's thread
            try:
                token.run_sync_soon(self._ended, done)
            except trio.RunFinishedError:
                pass

        start_soon(notify, ended)  # (started later if no thread can be had now: threads.py)

    def _ended(self, done: trio.Event) -> None:
        self._under_way.discard(done)
        done.set()


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


def _forget_entries(entries: list[tuple[int, bytes]], stale: list[int]) -> None:
    for ino, name in entries:
        try:
            pyfuse3.invalidate_entry(ino, name)
        except FileNotFoundError:
            pass  # not cached
        except OSError as e:
            log.debug("invalidating the name %s: %s", quoted(os.fsdecode(name)), e)
    for ino in stale:
        try:
            pyfuse3.invalidate_inode(ino, True)  # attributes only: a folder's entries, a file's pages stay
        except FileNotFoundError:
            pass  # not cached
        except OSError as e:
            log.debug("invalidating the attributes of inode %d: %s", ino, e)


def _drop_pages(ino: int, uri: str) -> None:
    try:
        pyfuse3.invalidate_inode(ino, False)
    except OSError as e:
        log.debug("invalidating the pages of %s: %s", quoted(uri), e)
