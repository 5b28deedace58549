"""A resource of the daemon's or the store's that ran out, said as what it is.

- Descriptors.  A GET that could not open a socket for want of one
  (`EMFILE`: the daemon's RLIMIT_NOFILE; `ENFILE`: the whole system's) reached
  the log as botocore's `EndpointConnectionError: Could not connect to the
  endpoint URL`, which sends an operator to the network.  botocore wraps the
  cause (`e.kwargs["error"]`, urllib3's NewConnectionError, raised from the
  OSError); `descriptor_errno` finds it in the chain, `descriptors` words it
  with the limit in force.

Imports nothing of lazyfs, and no botocore (the chain is walked by attribute),
so any module may use it.
"""

from __future__ import annotations

import errno
import resource

# A descriptor refused: the process's limit reached, or the system's.
DESCRIPTOR_ERRNOS = (errno.EMFILE, errno.ENFILE)


def descriptor_errno(e: BaseException | None) -> int:
    """EMFILE or ENFILE when `e`, or an exception it was raised from or wraps
    (botocore's `kwargs["error"]`, urllib3's `reason`), is an OSError for want
    of a descriptor; else 0."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen or len(seen) > 32:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in DESCRIPTOR_ERRNOS:
            return int(x.errno)
        kwargs = getattr(x, "kwargs", None)
        wrapped = [kwargs.get("error")] if isinstance(kwargs, dict) else []
        todo += [x.__cause__, x.__context__, getattr(x, "reason", None), *wrapped]
    return 0


def descriptors(err: int = errno.EMFILE) -> str:
    """What ran out, for a log line: the daemon's own limit, or the system's."""
    if err == errno.ENFILE:
        return "too many open files in the system: the kernel's limit (fs.file-max) is reached"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    also = f" (its hard limit {hard})" if hard not in (soft, resource.RLIM_INFINITY) else ""
    return f"too many open files: the daemon's descriptor limit (ulimit -n / RLIMIT_NOFILE) is {soft}{also}"
