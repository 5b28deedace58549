"""Where the CPU of some processes went, by layer, from `perf script` output
of a system-wide `perf record -a -g` (cpu-clock samples: on-CPU time only).

    perf record -a -g -F 199 -o perf.data -- sudo scripts/bench ... --py-spy DIR
    perf script -i perf.data -F pid,tid,comm,ip,sym,dso > perf.txt
    python -m benchmark.perfsum perf.txt --pid 1234 [--pid 5678] [--rate 199] [--gib 2.05]

Python frames are not visible to perf (libpython's C functions are): use it
for the split between the interpreter, hashing, copies and the kernel's work
(socket receive, page cache, page faults, /dev/fuse), and py-spy
(benchmark.spysum) for which Python code runs.  Each sample goes to the first
category, in the order below, that its call chain matches.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# (label, symbol or DSO substrings anywhere in the chain), most specific first.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("page faults (kernel: filling a mapping)", ("asm_exc_page_fault",)),
    ("MD5/CRC hashing (verification)", ("md5_block", "MD5_Update", "_md5", "md5", "crc32", "crc64", "libcrypto")),
    ("FUSE: reply to the kernel (writev to /dev/fuse, copy from the mapping)",
     ("fuse_dev_write", "fuse_dev_splice_write", "__x64_sys_writev")),
    ("FUSE: receive requests (read from /dev/fuse)", ("fuse_dev_read", "fuse_dev_splice_read")),
    ("socket receive (kernel: tcp_recvmsg, copy to user)", ("tcp_recvmsg", "sock_recvmsg", "__sys_recvfrom")),
    ("socket send (kernel)", ("tcp_sendmsg", "__sys_sendto")),
    ("pwrite into the sparse file (kernel: page cache write)", ("ksys_pwrite64", "__x64_sys_pwrite64")),
    ("pread / read of files (kernel)", ("ksys_pread64", "__x64_sys_pread64", "ksys_read", "do_preadv")),
    ("madvise, mmap, munmap (kernel)", ("__x64_sys_madvise", "__x64_sys_mmap", "__x64_sys_munmap")),
    ("futex, epoll, poll: thread and event hand-off (kernel)", ("__x64_sys_futex", "__x64_sys_epoll", "__x64_sys_poll",
                                                             "do_sys_poll")),
    ("other system calls (kernel)", ("entry_SYSCALL_64",)),
    ("memcpy/memmove (user)", ("__memmove", "__memcpy", "memcpy", "memmove")),
    ("libfuse and pyfuse3 (user)", ("libfuse3", "_pyfuse3", "pyfuse3")),
    ("Python interpreter (libpython: bytecode, objects, GC)", ("libpython",)),
    ("kernel, other (interrupts, scheduling)", ("[kernel.kallsyms]",)),
]
_HEAD = re.compile(r"^(?P<comm>.*?)\s+(?P<pid>\d+)/(?P<tid>\d+)\s*$")


def samples(path: Path, pids: set[int]) -> list[list[str]]:
    """The call chains (leaf first, 'sym (dso)') of the samples of `pids`."""
    out: list[list[str]] = []
    chain: list[str] | None = None
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                if chain is not None:
                    out.append(chain)
                chain = None
                continue
            if not line.startswith((" ", "\t")):
                m = _HEAD.match(line.rstrip())
                chain = [] if m and int(m.group("pid")) in pids else None
                continue
            if chain is not None:
                parts = line.strip().split(" ", 1)
                chain.append(parts[1] if len(parts) > 1 else parts[0])
    if chain is not None:
        out.append(chain)
    return out


def category(chain: list[str]) -> str:
    for label, needles in CATEGORIES:
        if any(n in frame for frame in chain for n in needles):
            return label
    return "other (user code without symbols)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="perfsum", description=__doc__.split("\n\n")[0])
    p.add_argument("perf_script", type=Path)
    p.add_argument("--pid", type=int, action="append", required=True, help="a process (all its threads)")
    p.add_argument("--rate", type=float, default=199.0, help="perf record -F")
    p.add_argument("--gib", type=float, help="GiB moved, for seconds per GiB")
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)
    chains = samples(a.perf_script, set(a.pid))
    total = len(chains)
    if not total:
        print("no samples")
        return 1
    cats = Counter(category(c) for c in chains)
    leaves = Counter(c[0] if c else "?" for c in chains)
    gib = f", {total / a.rate / a.gib:.2f} s/GiB" if a.gib else ""
    print(f"{total} samples = {total / a.rate:.2f} CPU s{gib}\n")
    print("| where | CPU s | share |" + (" s/GiB |" if a.gib else ""))
    print("|---|---:|---:|" + ("---:|" if a.gib else ""))
    for label, n in cats.most_common():
        s = n / a.rate
        print(f"| {label} | {s:.2f} | {100 * n / total:.0f}% |" + (f" {s / a.gib:.2f} |" if a.gib else ""))
    print(f"\nTop {a.top} innermost symbols:\n")
    for sym, n in leaves.most_common(a.top):
        print(f"    {100 * n / total:5.1f}%  {sym[:140]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
