"""Where a lazyfs daemon's busy samples go, from py-spy's collapsed stacks
(`scripts/bench --py-spy DIR` writes one file per mount).

    python -m benchmark.spysum DIR/seq-r0.txt [--rate 100] [--gib 1.0] [--top 15]

Samples / rate is thread-seconds.  py-spy leaves out threads it sees idle,
but with native frames a thread blocked on a lock, the GIL or poll still
counts: those stacks go to the first category, "waiting", and the rest is
roughly time on the CPU (for exact CPU per layer, see benchmark.perfsum).  Each
stack is put in the first category, in the order below, that one of its frames
matches; the rest is "other".  --gib divides seconds by the GiB moved.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# (label, substrings of a frame), most specific first.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    # With native frames py-spy counts a thread blocked in a lock, the GIL or
    # poll as busy: these are wall time, not CPU.
    (WAITING := "waiting, not on CPU (a lock or the GIL, poll, epoll, a condition)",
     ("PyThread_acquire_lock_timed", "pthread_cond_timedwait", "pthread_cond_wait", "take_gil", "sem_clockwait",
      "sem_timedwait", "epoll_wait (", "poll (")),
    ("verification after the last byte (lazyfs/verify.py: MD5/CRC of the whole file)", ("lazyfs/verify.py",)),
    ("pwrite of downloaded pieces into the sparse file", ("_pwrite_all", "pwrite64")),
    ("HTTP body reading (RangeStream.read: urllib3, http.client, socket recv)", ("RangeStream.read",)),
    ("HTTP request set-up (botocore: build, sign, send, parse headers; connection pool)",
     ("Remote.get_range", "Remote.head", "Remote._call", "botocore/")),
    ("download bookkeeping (lazyfs/fetch.py, download.py outside I/O)", ("lazyfs/fetch.py", "lazyfs/download.py")),
    ("FUSE read handler (fuse_ops/handles/store: mmap slice, MADV_DONTNEED)",
     ("Operations.read", "Handles.read", "FileMap.")),
    ("FUSE reply and request loop (pyfuse3, libfuse: /dev/fuse read/write, copy from the mapping)",
     ("_pyfuse3", "pyfuse3", "fuse_", "libfuse")),
    ("other FUSE handlers (lookup, getattr, open, release, ...)", ("lazyfs/fuse_ops.py",)),
    ("trio scheduler and thread hand-off (trio/_core, to_thread)", ("trio/",)),
    ("listing and catalog", ("lazyfs/catalog.py", "lazyfs/remote.py")),
    ("start-up (imports, config)", ("<module>", "_find_and_load", "lazyfs/config.py", "lazyfs/cli.py")),
]
_LINE = re.compile(r"^(?P<stack>.*) (?P<n>\d+)$")
_LOC = re.compile(r" \([^()]*\)$")


def parse(path: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line.strip())
        if m:
            out.append((m.group("stack").split(";"), int(m.group("n"))))
    return out


def category(frames: list[str]) -> str:
    for label, needles in CATEGORIES:
        if any(n in f for f in frames for n in needles):
            return label
    return "other"


def leaf(frames: list[str]) -> str:
    return frames[-1] if frames else "?"


def python_leaf(frames: list[str]) -> str:
    """The innermost Python frame (file.py:line in its location)."""
    for f in reversed(frames):
        if ".py:" in f:
            return f
    return "(no Python frame)"


def summarize(path: Path, rate: float, gib: float | None, top: int) -> str:
    stacks = parse(path)
    total = sum(n for _, n in stacks)
    if not total:
        return f"{path}: no samples"
    cats: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    pyleaves: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for frames, n in stacks:
        cats[category(frames)] += n
        leaves[_LOC.sub("", leaf(frames))] += n
        pyleaves[python_leaf(frames)] += n
        threads["trio thread (FUSE handlers)" if "MainThread" in frames[0] else "worker threads"] += n
    per = f", s/GiB at {gib:g} GiB" if gib else ""
    busy = total - cats[WAITING]
    lines = [(f"## {path.name}: {total} samples at {rate:g} Hz = {total / rate:.2f} thread-s, "
              f"{busy / rate:.2f} s not waiting{per}"), "",
             "| where | s | share |" + (" s/GiB |" if gib else ""), "|---|---:|---:|" + ("---:|" if gib else "")]
    for label, n in cats.most_common() + [("", 0)] + threads.most_common():
        if not label:
            continue
        s = n / rate
        lines.append(f"| {label} | {s:.2f} | {100 * n / total:.0f}% |" + (f" {s / gib:.2f} |" if gib else ""))
    lines += ["", f"Top {top} innermost frames (native included):", ""]
    lines += [f"    {100 * n / total:5.1f}%  {f[:150]}" for f, n in leaves.most_common(top)]
    lines += ["", f"Top {top} innermost Python frames:", ""]
    lines += [f"    {100 * n / total:5.1f}%  {f[:150]}" for f, n in pyleaves.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spysum", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--rate", type=float, default=100.0, help="py-spy's --rate (scripts/bench uses 100)")
    p.add_argument("--gib", type=float, help="GiB the daemon moved, for seconds per GiB")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv)
    print("\n\n".join(summarize(f, a.rate, a.gib, a.top) for f in a.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
