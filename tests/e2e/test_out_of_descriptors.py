"""End to end: a mount that runs out of file descriptors (README, the failure
table and exit codes; exhausted.py, offlinestart.py).

- At run time: its limit is lowered with `prlimit --pid` after it has served
  files (its FUSE session, its connections and a few copies exist), and then
  many different files are opened at once and held: the store-side opens (a
  download's lock and sparse file, a copy's descriptor, a resume record)
  meet EMFILE.  A reader gets EMFILE; each line names the limit (`ulimit
  -n`), never a bare "Too many open files" that leaves an operator guessing
  whose files those are; and once the limit is raised again every file
  reads right.
- At start: a limit too low to start with ends the start (exit 1) in one
  line naming it and what to do, wherever it is met (the store, the first
  listing, trio, the FUSE session); it said `internal error`, `store ... is
  not writable`, or sent the user to /dev/fuse and fusermount3.  A first
  listing that met it was taken for an unreachable object store: an offline
  start, or "the store has nothing to serve" for a store full of files.

Only the soft limit is lowered and raised at run time: raising a hard limit
takes CAP_SYS_RESOURCE, which a container's root may lack.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import subprocess
from pathlib import Path

import pytest

from support.mounting import FS, Mounter, lazyfs_cli, on_both_clients, wait_until
from support.mountproc import MountFailed
from support.proxy import Fault

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

P = "models/m"
NAMED = r"the daemon's descriptor limit \(ulimit -n / RLIMIT_NOFILE\) is \d+"
SAID = "too many open files: the daemon's descriptor limit (ulimit -n / RLIMIT_NOFILE) is "
FIX = "raise it (ulimit -n before lazyfs starts, or the container's nofile limit)"


def soft_limit(pid: int) -> int:
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]


def set_soft_limit(pid: int, soft: int) -> None:
    subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:"], check=True, capture_output=True, timeout=10)


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_and_read(path: Path, held: list[int]) -> bytes | tuple[str, str]:
    """The file's bytes, read through a descriptor that stays open (`held`),
    or the call that failed and its errno."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return "open", errno.errorcode.get(e.errno or 0, str(e.errno))
    held.append(fd)
    try:
        out = b""
        while chunk := os.read(fd, 1 << 20):
            out += chunk
        return out
    except OSError as e:
        return "read", errno.errorcode.get(e.errno or 0, str(e.errno))


@pytest.mark.log_errors(NAMED)
def test_store_side_descriptors_refused_name_the_limit_and_every_file_reads_once_it_is_raised(
        mount, s3, bucket, fs: FS, tmp_path: Path):
    files = {f"{P}/d{i % 3}/f{i:02d}.bin": os.urandom(30_000 + i) for i in range(60)}
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", "--retries", "1", store=store)
    keys = sorted(files)
    for key in keys[:10]:  # served: copies in the store, whose opens need a descriptor each
        assert fs.read(m.file(key)) == files[key]
    wait_until(lambda: all((store / key).exists() for key in keys[:10]), what="the first copies published")
    pid = m.process.pid
    before = soft_limit(pid)
    lowered = open_descriptors(pid) + 6
    set_soft_limit(pid, lowered)
    held: list[int] = []
    try:
        # The copies last: their opens meet the limit too, not only downloads' (each needs a descriptor).
        readers = {key: fs.start(open_and_read, m.file(key), held) for key in keys[10:] + keys[:10]}
        got = {key: f.result(timeout=120) for key, f in readers.items()}
    finally:
        for fd in held:
            os.close(fd)
        set_soft_limit(pid, before)
    refused = {key: v for key, v in got.items() if isinstance(v, tuple)}
    assert refused, "no open was refused: the limit was never met and the test proves nothing"
    assert set(refused.values()) <= {("open", "EMFILE"), ("read", "EMFILE")}, refused  # README: EMFILE
    wrong = [key for key, v in got.items() if not isinstance(v, tuple) and v != files[key]]
    assert wrong == [], "a file read whole or failed: never torn bytes"

    for key, data in files.items():  # the limit raised: every file, the refused ones too, reads right
        assert fs.read(m.file(key), timeout=60) == data, key
    log = m.log()
    assert "Traceback" not in log
    bare = [line for line in log.splitlines() if "Too many open files" in line]
    assert bare == [], "a line said the bare strerror, not whose limit ran out:\n" + "\n".join(bare[:10])
    store_side = [line for line in log.splitlines() if " the store" in line and "too many open files" in line]
    assert store_side, "no store-side open met the limit: the test proves nothing"
    assert all(f"(ulimit -n / RLIMIT_NOFILE) is {lowered}" in line for line in store_side), store_side[:5]


def put_files(s3, bucket: str, n: int = 3) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    files = {f"{P}/f{i}.bin": os.urandom(5000 + i) for i in range(n)}
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    return files


def fill_store(mount: Mounter, fs: FS, bucket: str, store: Path, files: dict[str, bytes]) -> None:
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    for key, data in files.items():
        assert fs.read(m.file(key)) == data
    wait_until(lambda: all((store / key).exists() for key in files), what="the copies published")
    assert m.stop() == 0


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("lazyfs: ")]


@pytest.mark.parametrize("store_holds", ["its files", "nothing"])
def test_a_first_listing_refused_a_descriptor_ends_the_start_naming_the_limit(
        mount: Mounter, proxy, s3, bucket, fs: FS, tmp_path: Path, store_holds: str):
    """The start-up listing's request is held (the proxy answers after 30 s);
    while the start waits for it, the daemon's limit is lowered to the
    number of that request's socket.  The request times out, its socket is
    closed, and the retry's socket gets no number below the limit: EMFILE.
    Before, that was an unreachable object store: with a store full of files,
    `... is 3, and the store ... has nothing to serve` (its files could not
    be opened either), with room for them an offline start."""
    files = put_files(s3, bucket)
    store = tmp_path / "store"
    if store_holds == "its files":
        fill_store(mount, fs, bucket, store, files)
    proxy.add(Fault("delay", method="GET", seconds=30, times=1))
    before = len(mount.started)
    starting = fs.start(lambda: mount("--prefix", f"s3://{bucket}/{P}", "--read-timeout", "8", "--retries", "1",
                                      store=store))
    process = wait_until(lambda: len(mount.started) > before and mount.started[-1].process.proc is not None
                         and mount.started[-1].process, what="the mount to start")
    wait_until(lambda: "waiting for the object store" in process.log(), timeout=30, what="the start to wait")
    pid = process.pid
    sockets = [fd for fd in map(int, os.listdir(f"/proc/{pid}/fd"))
               if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")]
    assert len(sockets) == 1, f"the listing's socket, and only it, is open: {sockets}"
    set_soft_limit(pid, sockets[0])
    with pytest.raises(MountFailed):
        starting.result(timeout=60)
    assert process.proc is not None and process.proc.returncode == 1
    [line] = error_lines(process.log())
    assert line.startswith(f'lazyfs: error: cannot list "s3://{bucket}/{P}/": {SAID}{sockets[0]}'), line
    assert line.endswith(f"; {FIX}"), line
    assert "OFFLINE" not in "".join(process.stdout_lines) and "Traceback" not in process.log()


def refusal(mount: Mounter, n: int) -> str:
    """The one line the last start, under a descriptor limit of `n`, ended with (exit 1)."""
    process = mount.started[-1].process
    assert process.proc is not None and process.proc.returncode == 1, (n, process.log())
    lines = error_lines(process.log())
    assert len(lines) == 1 and lines[0].startswith("lazyfs: error: "), (n, process.log())
    assert f"{SAID}{n}" in lines[0] and lines[0].endswith(f"; {FIX}"), (n, lines[0])
    return lines[0]


@pytest.mark.long
@on_both_clients  # the CRT's client takes ~20 descriptors as it is made: short of them, awscrt aborted the process
@pytest.mark.log_errors(NAMED)
def test_a_limit_too_low_to_start_with_ends_the_start_in_one_line_naming_it(
        mount: Mounter, s3, bucket, fs: FS, tmp_path: Path):
    """A sweep of hard limits from one the store cannot be opened with up to
    the first the mount starts with (and two more): each start either is
    ready or exits 1 with one line naming the limit and the fix, whichever
    step met it (the store, trio, the page-cache reader, the CRT client, the
    FUSE session)."""
    files = put_files(s3, bucket)
    store = tmp_path / "store"
    fill_store(mount, fs, bucket, store, files)
    outcomes: dict[int, str] = {}
    # Up to the CRT's ~50 (what a mount needs to serve a reader, fdneeds.py); every other one past 24 (time).
    for n in [*range(6, 24), *range(24, 64, 2)]:
        if list(outcomes.values())[-3:] == ["ready"] * 3:
            break
        try:
            m = mount("--prefix", f"s3://{bucket}/{P}", store=store, wrapper=["prlimit", f"--nofile={n}:{n}", "--"])
        except MountFailed:
            outcomes[n] = refusal(mount, n)
            continue
        outcomes[n] = "ready"
        assert m.stop() == 0
        ours = [line for line in m.log().splitlines() if not line.startswith("fuse: ")]  # (libfuse's own)
        bare = [line for line in ours if "Too many open files" in line]
        assert bare == [], (n, bare)
    said = "\n".join(f"{n}: {outcome}" for n, outcome in outcomes.items())
    assert "ready" in outcomes.values() and set(outcomes.values()) != {"ready"}, said
    assert all("Traceback" not in m.log() for m in mount.started)


NEEDS = re.compile(r"; a mount needs at least (\d+) to serve a reader \((\d+) in use or taken as it starts, ")


def read_errno(fs: FS, path: Path) -> bytes | str:
    try:
        return fs.read(path, timeout=90)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


@pytest.mark.long
@on_both_clients
@pytest.mark.log_errors(NAMED)
def test_a_mount_that_says_ready_serves_a_reader_or_it_does_not_start(
        mount: Mounter, s3, bucket, fs: FS, tmp_path: Path, transfer_client: str):
    """Limits a little above what the start itself takes (boto3: about 16;
    the CRT's client: about 35): the mount printed `ready`, and then every
    open, of a copy in the store as of a file to download, got EMFILE.  Now
    each limit of a sweep either starts a mount that reads a small file, a
    file of several parts (GETs in flight at once) and a copy in the store,
    or ends the start (exit 1) in one line naming the limit, what a mount
    needs and the fix."""
    small = {f"{P}/s{i}.bin": os.urandom(300_000 + i) for i in range(2)}
    large = {f"{P}/large.bin": os.urandom(40 << 20)}  # five parts of 8 MiB
    for key, data in (small | large).items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    outcomes: dict[int, str] = {}
    for n in range(14 if transfer_client == "boto3" else 34, 90, 2):
        if list(outcomes.values())[-3:] == ["ready"] * 3:
            break
        store = tmp_path / f"store{n}"
        try:
            m = mount("--prefix", f"s3://{bucket}/{P}", store=store, wrapper=["prlimit", f"--nofile={n}:{n}", "--"])
        except MountFailed:
            outcomes[n] = refusal(mount, n)
            continue
        got = {key: read_errno(fs, m.file(key)) for key in [*small, *large]}
        got["again"] = read_errno(fs, m.file(next(iter(small))))  # its copy in the store
        wrong = {key: v if isinstance(v, str) else "wrong bytes" for key, v in got.items()
                 if v != (small | large).get(key, small[next(iter(small))])}
        assert wrong == {}, f"ulimit -n {n}: the mount said ready, then {wrong}\n{m.log()[-3000:]}"
        assert m.stop() == 0
        outcomes[n] = "ready"
    said = "\n".join(f"{n}: {outcome}" for n, outcome in outcomes.items())
    assert list(outcomes.values())[-1] == "ready", said
    needs = [NEEDS.search(line) for line in outcomes.values()]
    assert any(needs), "no start was refused for want of a reader's descriptors: the test proves nothing\n" + said
    assert all("Traceback" not in m.log() for m in mount.started)


@pytest.mark.log_errors(NAMED)
def test_status_of_a_mount_out_of_descriptors_says_it_could_not_ask_never_missing(
        mount: Mounter, s3, bucket, fs: FS, tmp_path: Path):
    """`lazyfs status` of a mount at its descriptor limit: the mount's look
    at each copy (states.json) could not open it, and status called every
    cached file `missing`.  Now those files are left out and the summary
    says they could not be asked, naming the mount's limit: not ready (exit 1
    with --require-all); once the limit is raised, every file is cached."""
    files = put_files(s3, bucket, 4)
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    for key, data in files.items():
        assert fs.read(m.file(key)) == data
    wait_until(lambda: all((store / key).exists() for key in files), what="the copies published")
    pid = m.process.pid
    before = soft_limit(pid)
    held = set(map(int, os.listdir(f"/proc/{pid}/fd")))
    at = min(set(range(len(held) + 1)) - held)  # the lowest free number: no new descriptor (none is below it)
    set_soft_limit(pid, at)
    try:
        res = fs.run(lambda: lazyfs_cli(["status", str(m.path), "--require-all"]), timeout=60)
    finally:
        set_soft_limit(pid, before)
    rows, summary = res.stdout.splitlines()[1:-1], res.stdout.splitlines()[-1]
    assert not [row for row in rows if row.startswith("missing")], res.stdout
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "could not be asked for their state (too many open files: the daemon's descriptor limit (ulimit -n / " \
        f"RLIMIT_NOFILE) is {at} " in summary, summary  # (then its hard limit)
    res = fs.run(lambda: lazyfs_cli(["status", str(m.path), "--require-all"]), timeout=60)
    assert res.returncode == 0 and "4 cached" in res.stdout.splitlines()[-1], res.stdout
