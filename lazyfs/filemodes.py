"""The permission bits the mount shows for files (`--file-mode`), and the
execute bits of local copies that have them.

S3 keeps no mode, so a file from S3 shows `--file-mode` (default 0444: read
only, as before the flag; 0555 makes every file executable, as a user
shipping binaries and scripts wants).  A copy already on disk that is
executable (an image's prebaked `run.sh`, a binary baked with `--file-mode
0555`) keeps its execute bits through the mount, where `--file-mode` lets
read, so an image behaves the same with and without the mount.

Looking at a copy is a `stat` in each layer, blocking I/O: done in threads of
their own (at most LOOK_THREADS), once per version, when the kernel first
asks for a file's attributes (a lookup, a listing's entries) and again at
each `getattr`: the kernel asks that before it refuses to execute a file
whose cached mode has no execute bit, so a copy made executable since is seen.
A look that takes longer than LOOK_WAIT_S (a store on a filesystem that stopped
answering), or finds no thread to run in (the process at its thread limit,
threads.py), is abandoned: the file shows `--file-mode` until the next look.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Callable, Iterable, Sequence

import trio

from lazyfs.config import DEFAULT_FILE_MODE
from lazyfs.errors import NoThread
from lazyfs.layer import Layer, exec_bits
from lazyfs.namespace import RemoteObject, Version
from lazyfs.threads import run_sync

log = logging.getLogger(__name__)

LOOK_THREADS = 4
LOOK_WAIT_S = 1.0
# Files of one listing request looked at in one thread hop (a listing reply holds far fewer).
LOOK_BATCH = 256


class FileModes:
    """What the mount shows of each file's mode (trio-side; looks in threads)."""

    def __init__(self, file_mode: int = DEFAULT_FILE_MODE, layers: Callable[[], Sequence[Layer]] = tuple) -> None:
        self.file_mode = file_mode
        self._layers = layers  # the store's, then the prebaked ones: where a served copy comes from
        self._copies: dict[Version, int] = {}  # a version's local copy's execute bits, once looked at
        self._limiter = trio.CapacityLimiter(LOOK_THREADS)

    def shown(self, obj: RemoteObject) -> int:
        """Permission bits of the file (what was learned of its copy, if anything)."""
        return self.file_mode | self._copies.get(obj.version, 0)

    async def learn(self, nodes: Iterable[object], again: bool = False) -> None:
        """Look at the local copies of the files among `nodes` (only those not
        looked at yet, unless `again`; folders and lazyfs's own files have none)."""
        if exec_bits(0o111, self.file_mode) == self.file_mode & 0o111:
            return  # --file-mode lets every reader execute already (0555): a copy adds nothing
        wanted = [o for o in nodes if isinstance(o, RemoteObject) and (again or o.version not in self._copies)]
        wanted = wanted[:LOOK_BATCH]
        if not wanted or not self._layers():
            return
        with trio.move_on_after(LOOK_WAIT_S):  # abandoned then: a stat holds no descriptor
            try:
                found = await run_sync(self._look, wanted, limiter=self._limiter, abandon_on_cancel=True)
            except NoThread:
                return  # as a look abandoned: --file-mode until the next look (threads.py said why)
            self._copies.update(found)

    def _look(self, objs: list[RemoteObject]) -> dict[Version, int]:
        """Blocking: the execute bits (masked to --file-mode's readers) of the
        first copy of each file in the layers that could be served: a regular
        file of the object's size."""
        out: dict[Version, int] = {}
        layers = self._layers()
        for obj in objs:
            out[obj.version] = 0
            for layer in layers:
                st = _stat(layer, obj.key)
                if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == obj.size:
                    out[obj.version] = exec_bits(st.st_mode, self.file_mode)
                    break
        return out


def _stat(layer: Layer, key: str) -> os.stat_result | None:
    # One fstatat, not the O_NOFOLLOW walk that serving a copy takes (layer.open_file): only mode bits are
    # read here, and a copy that walk refuses is fetched into the store, which is looked at first.
    try:
        return os.stat(key, dir_fd=layer.fd, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            log.debug("%s: looking at %s: %s", layer.label, key, e)
        return None
