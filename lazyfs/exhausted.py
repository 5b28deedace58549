"""A resource of the daemon's or the store's that ran out, said as what it is.

- Descriptors.  A GET that could not open a socket for want of one
  (`EMFILE`: the daemon's RLIMIT_NOFILE; `ENFILE`: the whole system's) reached
  the log as botocore's `EndpointConnectionError: Could not connect to the
  endpoint URL`, which sends an operator to the network.  botocore wraps the
  cause (`e.kwargs["error"]`, urllib3's NewConnectionError, raised from the
  OSError); `descriptor_errno` finds it in the chain, `descriptors` words it
  with the limit in force.  The store's own opens (a download's lock, its
  sparse file and resume record, a copy's descriptor) said the bare strerror,
  "Too many open files": `strerror` words an OSError of theirs the same way.
  A command that cannot go on for want of one (a mount's start: its store,
  its first listing, its FUSE session) ends with that and `remedy`.
- Inodes.  A store whose filesystem has no free inode fails every file it
  creates with `ENOSPC`, "No space left on device", while `df -h` shows
  hundreds of MiB free; `no_room` says when it is the inodes (a statvfs:
  blocking, a worker thread's), `inodes_short` words a statvfs's.

Imports nothing of lazyfs, and no botocore (the chain is walked by attribute),
so any module may use it.
"""

from __future__ import annotations

import errno
import os
import resource

# A descriptor refused: the process's limit reached, or the system's.
DESCRIPTOR_ERRNOS = (errno.EMFILE, errno.ENFILE)
# Fewer free inodes than this when a file could not be made for ENOSPC: the
# inodes ran out, not the bytes (another process may have freed a few since).
FEW_INODES = 64
# Fewer descriptors left under the limit than this when a call failed
# without saying why: what it needed (a few at once) is taken to be why.
FEW_DESCRIPTORS = 16
# Whose limit `descriptors` names: a mount's process is the daemon (its lines' word for it), set once by
# the command line (cli.py) for the other commands.
_whose = ["the daemon's"]


def descriptor_errno(e: BaseException | None) -> int:
    """EMFILE or ENFILE when `e`, or an exception it was raised from or wraps
    (botocore's `kwargs["error"]`, urllib3's `reason`, a group's exceptions:
    a trio nursery's), is an OSError for want of a descriptor; else 0."""
    seen: set[int] = set()
    todo: list[object] = [e]
    while todo:
        x = todo.pop()
        # (Only exceptions: `reason` is a string on UnicodeDecodeError and ssl.SSLError.)
        if not isinstance(x, BaseException) or id(x) in seen or len(seen) > 32:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in DESCRIPTOR_ERRNOS:
            return int(x.errno)
        kwargs = getattr(x, "kwargs", None)
        wrapped = [kwargs.get("error")] if isinstance(kwargs, dict) else []
        todo += [x.__cause__, x.__context__, getattr(x, "reason", None), *wrapped, *getattr(x, "exceptions", ())]
    return 0


def not_a_daemon() -> None:
    """This process is a command that is not a mount (bake, lock, status,
    doctor...): its lines name "this process's" limit, not the daemon's."""
    _whose[0] = "this process's"


def descriptors(err: int = errno.EMFILE, whose: str | None = None) -> str:
    """What ran out, for a log line: this process's own limit (the daemon's,
    in a mount: `not_a_daemon`; or `whose`), or the system's."""
    whose = whose or _whose[0]
    if err == errno.ENFILE:
        return "too many open files in the system: the kernel's limit (fs.file-max) is reached"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    also = f" (its hard limit {hard})" if hard not in (soft, resource.RLIM_INFINITY) else ""
    return f"too many open files: {whose} descriptor limit (ulimit -n / RLIMIT_NOFILE) is {soft}{also}"


def remedy(err: int = errno.EMFILE) -> str:
    """What to do about it, for a command's last line."""
    if err == errno.ENFILE:
        return "other processes hold the system's descriptors: close some, or raise fs.file-max"
    return "raise it (ulimit -n before lazyfs starts, or the container's nofile limit)"


def short_of_descriptors(spare: int = FEW_DESCRIPTORS) -> int:
    """EMFILE if this process has fewer than `spare` descriptors left under
    its limit, ENFILE if the system refuses it one now, else 0: why a call
    that does not say may have failed (libfuse's mount; the CRT's event
    loops, which take several and give back those they had).  The open
    descriptors are counted in /proc/self/fd."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        in_use = len(os.listdir("/proc/self/fd")) - 1  # (not the listing's own)
        if soft != resource.RLIM_INFINITY and in_use + spare > soft:
            return errno.EMFILE
        os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        return e.errno if e.errno in DESCRIPTOR_ERRNOS else 0
    return 0


def strerror(e: OSError) -> str:
    """`e.strerror`, for a line that names the file and what could not be
    done with it; for a descriptor refused, what ran out and the limit in
    force (`descriptors`).  Not blocking."""
    if e.errno in DESCRIPTOR_ERRNOS:
        return descriptors(e.errno)
    return e.strerror or str(e)


def inodes_short(st: os.statvfs_result, few: int = FEW_INODES) -> str:
    """"no free inodes (304 in all)", or "only 12 free inodes of 304", when
    the filesystem has fewer than `few` free; "" when it has that many, or
    counts none (btrfs and many network filesystems make them as they go)."""
    if st.f_files <= 0 or st.f_favail >= few:
        return ""
    if st.f_favail <= 0:
        return f"no free inodes ({st.f_files:,} in all)"
    return f"only {st.f_favail:,} free inodes of {st.f_files:,}"


def no_room(e: OSError, fd: int) -> str:
    """`e`'s strerror (`strerror`: a descriptor refused names the limit), and
    for an ENOSPC on the filesystem of `fd` (the store's) that is out of
    inodes, that: "No space left on device: the store's filesystem has no
    free inodes (304 in all; 271.0 MiB free)".  Blocking (statvfs, for an
    ENOSPC): a worker thread's."""
    said = strerror(e)
    if e.errno != errno.ENOSPC:
        return said
    try:
        st = os.statvfs(fd)
    except OSError:
        return said
    short = inodes_short(st)
    if not short:
        return said  # the bytes ran out: the strerror says it
    free = f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB free"
    short = f"{short[:-1]}; {free})" if short.endswith(")") else f"{short} ({free})"
    return f"{said}: the store's filesystem has {short}"
