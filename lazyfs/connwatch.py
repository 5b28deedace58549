"""Hearing at once that the mount's kernel connection is gone.

`lazyfs umount --force` (or an abort through /sys/fs/fuse/connections) ends
the connection while requests may be in flight: their callers get
ECONNABORTED from the kernel at once.  pyfuse3's loop then stops reading
requests, but its main() waits for every handler in flight, and a read
waiting for bytes that do not come ends only at --read-deadline: meanwhile
the daemon went on downloading beside a restarted mount sharing its store,
and each late reply failed in an ERROR line.  No reply can reach the kernel
any more, so the mount abandons those requests as soon as the connection is
gone, and stops as at SIGTERM.

How it hears it, with no thread and no polling: /dev/fuse polls EPOLLERR
once its connection is aborted, and wakes its pollers then (the kernel's
fuse_dev_poll and fuse_abort_conn).  An epoll set holding the session's
descriptor with no event asked for reports only that (EPOLLERR is always
reported; a request arriving, EPOLLIN, is not asked for), and the set itself
is readable exactly then: trio waits on it as on a socket, beside pyfuse3's
own wait on the descriptor.  An unmount by name ends the connection too,
after the last request was answered (the kernel refuses to unmount a busy
mount, and a lazy unmount keeps the connection while files are open).
"""

from __future__ import annotations

import logging
import os
import select
from typing import Callable

import trio

from lazyfs import wording
from lazyfs.exhausted import strerror

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"


def fuse_descriptor() -> int | None:
    """The process's one descriptor of /dev/fuse (pyfuse3's session's, once
    mounted), or None when there is not exactly one."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == FUSE_DEVICE:
                found.append(int(name))
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return found[0] if len(found) == 1 else None


class ConnectionWatch:
    """Waits for the connection of one /dev/fuse descriptor to end.  The
    epoll set holds no reference to the descriptor's file: the session's
    close still ends the connection."""

    def __init__(self, fd: int) -> None:
        self._epoll = select.epoll()
        self._epoll.register(fd, 0)  # no event asked for: only EPOLLERR, the connection's end

    @classmethod
    def of_session(cls) -> ConnectionWatch | None:
        try:
            fd = fuse_descriptor()
            if fd is not None:
                return cls(fd)
            why = f"no single {FUSE_DEVICE} descriptor"
        except OSError as e:
            why = strerror(e)
        log.warning("cannot watch the kernel connection (%s): after `umount --force`, requests in flight "
                    "end only at their deadline", why)
        return None

    def gone(self) -> bool:
        return bool(self._epoll.poll(0))

    async def wait_gone(self) -> None:
        while not self.gone():  # the set may wake with nothing to report
            await trio.lowlevel.wait_readable(self._epoll.fileno())

    def close(self) -> None:
        self._epoll.close()


async def abandon_when_gone(serving: trio.CancelScope, in_flight: Callable[[], int]) -> None:
    """Cancel `serving` (pyfuse3's main loop, with the handlers in flight)
    once the session's connection is gone; one line says how many requests
    were abandoned, if any."""
    watch = ConnectionWatch.of_session()
    if watch is None:
        return
    try:
        await watch.wait_gone()
    finally:
        watch.close()
    if n := in_flight():
        log.info("%s in flight abandoned because the kernel connection was aborted (no answer could reach it)",
                 wording.count(n, "request"))
    serving.cancel()
