"""The benchmark's emulated object-store network ("wan" mode).

Parallel ranged GETs and prefetch pay off only where each connection is slow
and every request waits for its first byte, as on real S3 (about 30 ms to the
first byte, about 75 MB/s per connection).  Plain loopback has neither, so the
S3 server runs in a network namespace of its own, reached over a veth pair:

  * bandwidth per connection: traffic leaving the namespace (server to client)
    goes through an HTB qdisc with one class per bucket of client TCP ports; a
    u32 filter hashes the destination port into those buckets, so each
    connection is paced on its own and parallel connections add up.  (This
    kernel has HTB, TBF and u32 but neither netem nor fq, which would be the
    usual tools.)
  * first-byte latency: the server itself waits before each request
    (s3rver_wrapper.js --delay-ms), so it is per request, not per packet, which
    is also how in-region S3 behaves (its round trip is about a millisecond;
    the rest is time to first byte).

Addresses come from 198.18.0.0/15, the range set aside for benchmarks
(RFC 2544), one /30 per run, and exist only on the veth pair we create.
Everything here needs root.  A namespace is named after the PID of the run
that made it, so a later run can remove what a killed one left behind.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

NS_PREFIX = "lzbench-"
# Client ports are hashed into this many classes (u32's largest hash table).
CLASSES = 256
# Linux hands out even ephemeral ports to connect() (odd ones to bind()), so
# bit 0 of the port carries nothing: hash bits 1..8.
_PORT_HASH_MASK = 0x000001FE


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {(res.stderr or res.stdout).strip()[-400:]}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def reap_stale() -> list[str]:
    """Remove the namespaces (and host-side links) of benchmark runs that died."""
    removed = []
    for name in namespaces():
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)", name)
        if m and not _pid_alive(int(m.group(1))):
            _run("ip", "netns", "del", name, check=False)
            _run("ip", "link", "del", f"lzbh{m.group(1)}", check=False)
            removed.append(name)
    return removed


class WanLink:
    """A namespace for the server, a veth pair to it, and per-connection pacing."""

    def __init__(self, rate_mbit: float, workdir: Path, tag: int | None = None) -> None:
        tag = os.getpid() if tag is None else tag
        self.name = f"{NS_PREFIX}{tag}"
        self.host_if = f"lzbh{tag}"  # interface names are limited to 15 characters
        self.ns_if = f"lzbn{tag}"
        self.rate_mbit = rate_mbit
        self.workdir = workdir
        self.host_ip = ""
        self.ns_ip = ""
        self._made = False

    def __enter__(self) -> WanLink:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def exec_prefix(self) -> list[str]:
        """Prepended to a command to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def up(self) -> None:
        third = self._free_subnet()
        self.host_ip, self.ns_ip = f"198.18.{third}.1", f"198.18.{third}.2"
        self._made = True  # from here on, down() has something to undo
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _run("ip", "link", "set", self.ns_if, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        inside = self.exec_prefix()
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _run(*inside, "ip", "link", "set", self.ns_if, "up")
        self._pace()

    def _free_subnet(self) -> int:
        used = _run("ip", "-4", "-o", "addr", check=False).stdout + _run("ip", "-4", "route", check=False).stdout
        start = os.getpid() % 250
        for k in range(250):
            third = (start + k) % 250 + 1
            if f"198.18.{third}." not in used:
                return third
        raise RuntimeError("no free 198.18.X.0/30 subnet for the emulated network")

    def _pace(self) -> None:
        """One HTB class per hash bucket of client ports, each capped at the
        per-connection rate; unmatched traffic (ARP, ...) is not shaped."""
        dev, rate = self.ns_if, f"{self.rate_mbit:g}mbit"
        # A few milliseconds' worth of bytes: large enough that HTB's timer
        # granularity does not cap a class below its rate, small enough to pace.
        burst = max(64 * 1024, int(self.rate_mbit * 1e6 / 8 * 0.004))
        cmds = [f"qdisc add dev {dev} root handle 1: htb default 0"]
        for i in range(CLASSES):
            cmds.append(f"class add dev {dev} parent 1: classid 1:{0x100 + i:x} htb rate {rate} ceil {rate} "
                        f"burst {burst} cburst {burst}")
        cmds.append(f"filter add dev {dev} parent 1: prio 1 handle 7: protocol ip u32 divisor {CLASSES}")
        for i in range(CLASSES):
            cmds.append(f"filter add dev {dev} parent 1: prio 1 protocol ip u32 ht 7:{i:x}: "
                        f"match u32 0 0 flowid 1:{0x100 + i:x}")
        # Word 20 of an IPv4 packet without options is (source port << 16) | destination port.
        cmds.append(f"filter add dev {dev} parent 1: prio 1 protocol ip u32 ht 800:: "
                    f"match ip protocol 6 0xff hashkey mask 0x{_PORT_HASH_MASK:08x} at 20 link 7:")
        batch = self.workdir / "tc.batch"
        batch.write_text("\n".join(cmds) + "\n")
        _run(*self.exec_prefix(), "tc", "-batch", str(batch))

    def bytes_to_host(self) -> int | None:
        """Bytes the server side sent over the link (frames included)."""
        try:
            return int(Path(f"/sys/class/net/{self.host_if}/statistics/rx_bytes").read_text())
        except (OSError, ValueError):
            return None

    def down(self) -> None:
        """Idempotent.  Processes still inside would keep the namespace alive
        unnamed: stop the server first."""
        if not self._made:
            return
        self._made = False
        _run("ip", "netns", "del", self.name, check=False)
        _run("ip", "link", "del", self.host_if, check=False)  # normally gone with the namespace
