"""The last resort of a stop that cannot finish.

A stop (SIGTERM, SIGINT, an unmount from outside) ends the FUSE loop, then
waits for the mount's tasks; trio waits for every worker thread it did not
abandon.  A thread stuck in the kernel for good (in a store whose network
filesystem stopped answering) would keep the process alive after its mount
stopped serving: a container stop would end in SIGKILL, and the mount would
be left not answering.  So a stop arms a timer thread: if the process has not
ended by itself in time, the timer aborts and detaches the mount (readers
waiting on it get ECONNABORTED), says so in one line, and exits 0, as a stop
does: the process is killable even with such a thread (FUSE and NFS waits
are), and downloads resume at the next start.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

from lazyfs.mounttab import MountError, abort_and_detach, find_mount

log = logging.getLogger(__name__)


class LastStop:
    def __init__(self, mountpoint: Path, after: float) -> None:
        self.mountpoint = mountpoint
        self.after = after
        self._timer: threading.Timer | None = None
        self._device = ""  # our mount's, in the mount table: what the timer may detach

    def mounted(self) -> None:
        """Remember which mount at the mountpoint is ours: by the time the
        timer fires, the next start may have taken the path over."""
        entry = find_mount(self.mountpoint)
        self._device = entry.device if entry is not None else ""

    def arm(self) -> None:
        """Start the timer (once; later calls change nothing)."""
        if self._timer is None:
            timer = threading.Timer(self.after, self._give_up)
            timer.daemon = True  # a process that ends by itself does not wait for it
            try:
                timer.start()
            except RuntimeError as e:  # the process at its thread limit: the stop goes on, unguarded
                log.warning("the stop goes on without its %g s limit: cannot start a thread (%s)", self.after, e)
                return  # (the next call tries again)
            self._timer = timer

    def _give_up(self) -> None:
        entry = find_mount(self.mountpoint)
        ours = entry is not None and entry.device == self._device
        log.warning("the stop did not finish in %g s (a thread is stuck in the kernel: is the store's filesystem "
                    "answering?); %s and exiting", self.after,
                    f"detaching {self.mountpoint}" if ours else "leaving the mountpoint alone (not our mount)")
        try:
            if ours:
                abort_and_detach(self.mountpoint)
        except MountError as e:
            log.warning("%s", e)
        for flush in [h.flush for h in logging.getLogger().handlers] + [sys.stdout.flush, sys.stderr.flush]:
            try:
                flush()
            except (OSError, ValueError):  # a stream closed or broken (the log pipe gone): exit all the same
                pass
        os._exit(0)
