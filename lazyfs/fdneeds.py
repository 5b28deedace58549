"""The descriptors a mount needs to serve a reader, checked before it mounts.

A limit (`ulimit -n`) that let the start through but left nothing over for
an open (about 15 to 22 with the boto3 client, about 40 with the CRT's, whose
event loops take ~20) made a mount that printed `ready` and then failed every
open with EMFILE.  So, before mounting, the descriptors in use are counted
and the ones one reader needs added: the start ends (exit 1, one line naming
the limit and what it needs) unless one reader with one GET fits; and the
GETs in flight (`--max-connections`) are lowered to what the rest allows, as
`--memory-limit` lowers them (memlimit.py), so a reader of a large file does
not find its GETs refused a socket.

Not blocking: a listing of /proc/self/fd, and getrlimit.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import resource

from lazyfs.config import MountConfig
from lazyfs.exhausted import descriptors
from lazyfs.mounttab import MountError

log = logging.getLogger(__name__)

# The FUSE session's /dev/fuse, and the socket fusermount3 hands it over
# through; the connection watch's epoll set (connwatch.py).
FUSE_SESSION = 3
# One open served: the reader's descriptor of the copy (and its page-cache
# reader's dup); its download's lock, sparse file, read-only pin and resume
# record; hashing's two of the file (O_DIRECT, read-ahead off); a publish's.
ONE_OPEN = 9
# One ranged GET in flight: its socket, and its PieceWriter's O_DIRECT
# descriptor of the sparse file.
PER_GET = 2
# A metrics endpoint (--metrics-port): its listening socket and a scrape's.
METRICS = 2


def in_use() -> int:
    """The descriptors this process holds now (/proc/self/fd, less the listing's own)."""
    return len(os.listdir("/proc/self/fd")) - 1


def needed(held: int, gets: int = 1) -> int:
    """The limit a mount holding `held` descriptors (its own, and those it
    will take before serving: the transfer client's, the FUSE session's)
    needs to serve one reader with `gets` GETs in flight."""
    return held + FUSE_SESSION + ONE_OPEN + PER_GET * gets


def parallel_gets(soft: int, held: int, max_connections: int) -> int:
    """The GETs in flight a limit of `soft` allows (at most
    `max_connections`); 0 when not even one reader with one GET fits."""
    least = needed(held)
    if soft < least:
        return 0
    return min(max_connections, 1 + (soft - least) // PER_GET)


def too_few(held: int) -> str:
    """The end of the line that refuses the start (after the limit's own words)."""
    return (f"a mount needs at least {needed(held)} to serve a reader ({held} in use or taken as it starts, "
            f"{FUSE_SESSION} for the FUSE session, {ONE_OPEN + PER_GET} for one open and its GET)")


def fit_descriptors(cfg: MountConfig, client: int) -> MountConfig:
    """One reader at least, or no mount: MountError (EMFILE: cli adds what
    to do) naming the limit and what it needs; fewer GETs in flight if the
    limit says so.  `client`: what the transfer client will take as it is
    made (crt.CRT_DESCRIPTORS; boto3's: none, it is made)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return cfg
    held = in_use() + client + (METRICS if cfg.metrics_port is not None else 0)
    conns = parallel_gets(soft, held, cfg.fetch.max_connections)
    if conns == 0:
        raise MountError(f"cannot mount at {cfg.mountpoint}: {descriptors()}; {too_few(held)}", errno.EMFILE)
    if conns < cfg.fetch.max_connections:
        log.info("the descriptor limit (ulimit -n) %d allows %d parallel GETs", soft, conns)
        cfg = dataclasses.replace(cfg, fetch=dataclasses.replace(cfg.fetch, max_connections=conns))
    return cfg
