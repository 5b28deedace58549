"""A FUSE request whose caller is being killed ends at once, with EINTR.

When a task waiting in a FUSE request the daemon has read gets a signal, the
kernel sends FUSE_INTERRUPT for the request; after a fatal signal it then
waits for the answer uninterruptibly.  So a reader killed while it waited for
a download (`kill -9`, an OOM kill, a pod's stop) stayed in D state until
lazyfs answered: up to --read-deadline, and an open waiting for a whole file
up to the file's whole download.

The kernel interrupts a request for a signal that kills nobody too (SIGCHLD,
SIGALRM, SIGWINCH, a SIGINT the program handles).  A read of a local file
never fails with EINTR, and much C code does not retry one: such an
interrupt must change nothing.  So a request ends early only when its task
is being killed: a fatal signal (SIGKILL, or any signal whose default action
kills) makes the kernel add SIGKILL to the pending set of every thread of the
process (`SigPnd` in /proc/<tid>/status), and the request's pid is its
thread's id.  That is read on a thread of its own limiter (a /proc read is
quick, but no file I/O runs on the trio thread: docs/concurrency.md).  A
request whose task lives on is looked at again every RECHECK_S while it is
unanswered: a SIGKILL that comes after a handled signal brings no second
FUSE_INTERRUPT.

Cancelling a handler leaves nothing behind (every wait it can be in ends in
`finally`: waiters, readers, a probe's late verdict); the download goes on
for other readers and for the store.  An open is cancelled only before it
made its handle (its reply follows with no `await` between), and the kernel
sends no RELEASE for an open answered EINTR.

This needs the pyfuse3 of scripts/native/build-pyfuse3 (pyfuse3.INTERRUPTED_HOOK);
with another one interrupts are ignored, as they always were.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Callable, Protocol

import trio

from lazyfs.threads import run_sync

log = logging.getLogger(__name__)

# How often a request whose task was interrupted but not killed is looked at again.
RECHECK_S = 0.5
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


class InterruptedRequest(Protocol):
    """pyfuse3.InterruptedRequest, as the patched pyfuse3 hands it over."""

    @property
    def pid(self) -> int: ...
    @property
    def answered(self) -> bool: ...
    def cancel(self) -> None: ...


def killed_thread_name(status: str) -> str | None:
    """The thread's name if the text of its /proc/<tid>/status shows SIGKILL
    pending (its own or its process's: it is being killed); else None."""
    name = ""
    killed = False
    for line in status.splitlines():
        field, _, value = line.partition(":")
        if field == "Name":
            name = value.strip()
        elif field in ("SigPnd", "ShdPnd"):
            try:
                killed |= bool(int(value.strip(), 16) & _SIGKILL_BIT)
            except ValueError:
                pass
    return name if killed else None


def killed_threads(tids: list[int]) -> dict[int, str]:
    """Blocking: those of threads `tids` being killed, with their names.  A
    thread not found (gone, or in a PID namespace this one cannot see: id 0)
    is not: a request ends early only when that is known."""
    killed = {}
    for tid in tids:
        if tid <= 0:
            continue
        try:
            with open(f"/proc/{tid}/status", encoding="utf-8", errors="replace") as f:
                name = killed_thread_name(f.read())
        except OSError:
            continue
        if name is not None:
            killed[tid] = name
    return killed


class KillWatch:
    """Ends the interrupted FUSE requests of tasks being killed
    (Operations.interrupted); `run` does it, in the mount's nursery."""

    def __init__(self, killed: Callable[[list[int]], dict[int, str]] = killed_threads,
                 recheck_s: float = RECHECK_S) -> None:
        self._killed = killed
        self._recheck_s = recheck_s
        self._requests: list[InterruptedRequest] = []  # interrupted, unanswered, their task not known killed
        self._new = trio.Event()
        self._limiter = trio.CapacityLimiter(1)  # one look at /proc at a time: they are batched
        self.ended = 0  # requests answered EINTR

    def interrupted(self, request: InterruptedRequest) -> None:
        """pyfuse3's hook: the kernel interrupted `request`.  On the trio
        thread, within pyfuse3's worker: it only notes the request."""
        self._requests.append(request)
        self._new.set()

    async def run(self) -> None:
        while True:
            with trio.move_on_after(self._recheck_s if self._requests else math.inf):
                await self._new.wait()
            self._new = trio.Event()
            await self.look()

    async def look(self) -> None:
        """End the requests of the tasks being killed; keep watching the others."""
        self._requests = [r for r in self._requests if not r.answered]
        if not self._requests:
            return
        tids = sorted({r.pid for r in self._requests})
        killed = await run_sync(self._killed, tids, limiter=self._limiter, abandon_on_cancel=True)
        for r in self._requests:
            if r.pid in killed and not r.answered:
                r.cancel()
                self.ended += 1
                log.info("thread %d (%s) is being killed: its request stops waiting (EINTR)", r.pid,
                         killed[r.pid], extra={"event": "killed_reader"})
        # Requests interrupted meanwhile are kept: they are looked at next.
        self._requests = [r for r in self._requests if r.pid not in killed and not r.answered]
