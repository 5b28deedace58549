"""`lazyfs doctor`: check everything a mount needs, one line each with a fix.

Exit 0 when every check passes (warnings are allowed), 1 otherwise.  Never
mounts anything and never prints a secret.  LAZYFS_FUSE_DEVICE overrides the
FUSE device path (to rehearse a host without /dev/fuse).
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import shutil
import socket
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

from lazyfs import interrupt, redact, wording
from lazyfs.catalog import Catalog
from lazyfs.config import DoctorConfig, RemoteConfig
from lazyfs.errors import BadEndpoint, LazyfsError, again
from lazyfs.identity import user_xattrs_work
from lazyfs.mounttab import BrokenMount, broken_mount_holding, find_mount, has_cap_sys_admin, on_mount, probe_mount
from lazyfs.namespace import MARKER_BODY, UNSAFE, Skipped, Tree
from lazyfs.passthrough import kernel_at_least, kernel_passes_through
from lazyfs.remote import Remote

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Check:
    status: str
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """One line, whatever a detail holds (an exception's text can carry a
        name from a listing); names lazyfs puts in are quoted (wording.quoted);
        a URL's password masked (redact.urls), whatever put it there."""
        text = f"{self.status:<4}  {self.name}: {self.detail}"
        fix = f" -> fix: {self.fix}" if self.fix and self.status != OK else ""
        return redact.urls(wording.one_line(text + fix))


def run(cfg: DoctorConfig, out: TextIO = sys.stdout) -> int:
    checks: list[Callable[[DoctorConfig], list[Check]]] = [
        fuse_device, fusermount, passthrough, direct_reads, killed_readers, allow_other, mountpoint, store,
        credentials, endpoint, sources]
    failed = False
    for check in checks:
        for result in check(cfg):
            print(result.line(), file=out, flush=True)
            failed = failed or result.status == FAIL
    return 1 if failed else 0


def fuse_device(cfg: DoctorConfig) -> list[Check]:
    dev = os.environ.get("LAZYFS_FUSE_DEVICE", "/dev/fuse")
    if not os.path.exists(dev):
        return [Check(FAIL, "fuse device", f"{dev} is missing",
                      "load the fuse module on the host; in a container add --device /dev/fuse "
                      "(Kubernetes: privileged, or a FUSE device plugin)")]
    try:
        os.close(os.open(dev, os.O_RDWR))
    except OSError as e:
        return [Check(FAIL, "fuse device", f"{dev} cannot be opened ({e.strerror})",
                      "run as root, or give the container --cap-add SYS_ADMIN and the device")]
    return [Check(OK, "fuse device", f"{dev} present and openable")]


def passthrough(cfg: DoctorConfig) -> list[Check]:
    """Whether the kernel will read complete copies itself (passthrough.py)."""
    release = os.uname().release
    try:
        pyfuse3 = importlib.metadata.version("pyfuse3")
    except importlib.metadata.PackageNotFoundError:
        pyfuse3 = "(not installed)"
    missing = [reason for ok, reason in (
        (kernel_passes_through(release), f"Linux {release} is older than 6.9"),
        (pyfuse3.endswith("+passthrough"), f"pyfuse3 {pyfuse3} cannot ask for it"),
        (has_cap_sys_admin(), "no CAP_SYS_ADMIN")) if not ok]
    if missing:
        return [Check(WARN, "passthrough", "; ".join(missing) + ": lazyfs serves every read itself (a restart "
                      "reads at FUSE speed, not the disk's)", "Linux 6.9+, CAP_SYS_ADMIN, and the pyfuse3 "
                      "scripts/native/build-pyfuse3 builds (scripts/setup and the Dockerfile use it)")]
    return [Check(OK, "passthrough", f"the kernel reads complete copies itself (Linux {release}, pyfuse3 {pyfuse3})")]


def direct_reads(cfg: DoctorConfig) -> list[Check]:
    """Whether a big file read as it arrives can skip the mount's page cache
    (fuse_ops.DIRECT_IO_FROM): the kernel must let such a handle be mapped."""
    from lazyfs.fuse_ops import ASKS_TO_MAP_DIRECT_HANDLES  # here: the other checks need no pyfuse3

    release = os.uname().release
    missing = [reason for ok, reason in (
        (kernel_at_least((6, 6), release), f"Linux {release} is older than 6.6"),
        (ASKS_TO_MAP_DIRECT_HANDLES, "this pyfuse3 cannot ask for it")) if not ok]
    if missing:
        return [Check(WARN, "direct reads", "; ".join(missing) + ": a big file read as it downloads goes through "
                      "the mount's page cache (one more copy of each byte)", "Linux 6.6+ and the pyfuse3 "
                      "scripts/native/build-pyfuse3 builds")]
    return [Check(OK, "direct reads",
                  f"a big file read as it downloads skips the mount's page cache (Linux {release})")]


def killed_readers(cfg: DoctorConfig) -> list[Check]:
    """Whether a reader killed while it waits for a download dies at once
    (killwatch.py): pyfuse3 must hand the kernel's interrupts over."""
    from lazyfs.fuse_ops import HEARS_INTERRUPTS  # here, as in direct_reads: the other checks need no pyfuse3

    if not HEARS_INTERRUPTS:
        return [Check(WARN, "killed readers", "this pyfuse3 does not pass the kernel's interrupts on: a reader killed "
                      "while it waits for a download stays unkillable until its read is answered (up to "
                      "--read-deadline)", "the pyfuse3 scripts/native/build-pyfuse3 builds")]
    return [Check(OK, "killed readers", "a reader killed while it waits for a download dies at once")]


def fusermount(cfg: DoctorConfig) -> list[Check]:
    path = shutil.which("fusermount3")
    if path is None:
        return [Check(FAIL, "fusermount3", "not installed", "apt-get install fuse3")]
    return [Check(OK, "fusermount3", path)]


def allow_other(cfg: DoctorConfig) -> list[Check]:
    if not cfg.allow_other:
        return []
    if os.geteuid() == 0:
        return [Check(OK, "allow_other", "running as root: no /etc/fuse.conf setting needed")]
    try:
        with open("/etc/fuse.conf", encoding="utf-8") as f:
            enabled = any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        enabled = False
    if not enabled:
        return [Check(FAIL, "allow_other", "--allow-other needs user_allow_other in /etc/fuse.conf",
                      "echo user_allow_other >> /etc/fuse.conf")]
    return [Check(OK, "allow_other", "user_allow_other is set in /etc/fuse.conf")]


def mountpoint(cfg: DoctorConfig) -> list[Check]:
    path = cfg.mountpoint
    entry = find_mount(path)  # first: stat() of a dead mount fails with ENOTCONN
    if entry is not None and entry.fstype.startswith("fuse"):
        state = probe_mount(path)
        if state == errno.ENOTCONN:
            stale = BrokenMount(entry, dead=True)
            return [Check(FAIL, "mountpoint", f"{path} is {stale.what}",
                          f"{stale.fix} (lazyfs mount also cleans it up at start)")]
        if state is None:
            also = " (or start lazyfs mount: it takes over a lazyfs mount that does not answer)" \
                if entry.fstype == "fuse.lazyfs" else " (if its daemon is gone or hung)"
            return [Check(FAIL, "mountpoint", f"{path} is mounted but not responding",
                          f"lazyfs umount --force {path}{also}")]
        return [Check(WARN, "mountpoint", f"{path} is already mounted ({entry.fstype}); a second mount "
                      "would be refused", f"lazyfs umount {path} first")]
    if (broken := _on_broken_mount("mountpoint", path)) is not None:
        return [broken]
    if not path.exists():
        return [Check(FAIL, "mountpoint", f"{path} does not exist", f"mkdir -p {path}")]
    if not path.is_dir():
        return [Check(FAIL, "mountpoint", f"{path} is not a directory", "choose a directory")]
    return [Check(OK, "mountpoint", f"{path} exists and is not mounted")]


def _on_broken_mount(name: str, path: Path) -> Check | None:
    """A path inside a FUSE mount whose daemon died or does not answer:
    looking at it would fail, or hang doctor."""
    broken = broken_mount_holding(path)
    if broken is None:
        return None
    also = "" if broken.dead else " (if its daemon is gone or hung)"
    return Check(FAIL, name, f"{path} {on_mount(path, broken.entry.mountpoint)} {broken.what}", broken.fix + also)


def store(cfg: DoctorConfig) -> list[Check]:
    path = cfg.store
    entry = find_mount(path)
    if entry is not None and entry.fstype.startswith("fuse"):
        return [Check(WARN, "store", f"{path} is covered by a FUSE mount; its own folder is out of "
                      "reach from here", "run doctor before mounting, or give --store")]
    if (broken := _on_broken_mount("store", path)) is not None:
        return [broken]
    existing = path
    while not existing.exists():
        existing = existing.parent
    probe = existing / f".lazyfs-doctor-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return [Check(FAIL, "store", f"{existing} is not writable ({e.strerror})",
                      "fix its permissions or mount options, or give --store a writable folder (a read-only "
                      "folder of baked files is served as --prebaked; lazyfs status judges it as it is)")]
    if existing != path:
        return [Check(OK, "store", f"{path} will be created"), identity_records(existing)]
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    # A filesystem out of inodes fails every new file with ENOSPC, whatever the bytes free (a
    # small ext4 made with few: mkfs.ext4 -N); one counting none (btrfs, ramfs) makes them as it goes.
    inodes = f", {st.f_favail:,} of {st.f_files:,} inodes free" if st.f_files > 0 else ""
    few_inodes = st.f_files > 0 and st.f_favail < FEW_INODES
    if st.f_blocks == 0:
        return [Check(WARN if few_inodes else OK, "store", f"{path} writable (its filesystem states no size)"
                      f"{inodes}", INODES_FIX), identity_records(path)]
    few_bytes = free < 1 << 30
    fix = "; ".join([BYTES_FIX] * few_bytes + [INODES_FIX] * few_inodes)
    return [Check(WARN if few_bytes or few_inodes else OK, "store",
                  f"{path} writable, {free / 2**30:.1f} GiB free{inodes}", fix), identity_records(path)]


# Fewer free inodes than this on the store's filesystem is a warning: each file, folder, and
# download in progress (its file, lock and resume record) takes one.
FEW_INODES = 10_000
BYTES_FIX = "free some space or use a bigger volume for the store"
INODES_FIX = ("free some inodes (each file and folder takes one) or make the store's filesystem with more "
              "(mkfs.ext4 -N or -i; xfs and btrfs make them as they go)")


def identity_records(folder: Path) -> Check:
    """Where lazyfs will keep what version each local file is: in xattrs, or
    (where the filesystem refuses them) in sidecar files tied to inodes."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        works = user_xattrs_work(fd)
    finally:
        os.close(fd)
    if works:
        return Check(OK, "identity records", f"{folder} keeps user extended attributes (user.lazyfs.identity)")
    return Check(WARN, "identity records", f"{folder}'s filesystem keeps no user extended attributes (tmpfs "
                 "before Linux 6.6, ramfs, many NFS exports): lazyfs keeps identity records in sidecar files "
                 "under .lazyfs/identities/, tied to each file's inode, so a copy of the store (an image layer) "
                 "loses them and its files are judged by size",
                 "nothing to do for a store used in place; for a store you copy, use a filesystem with user "
                 "xattrs (ext4, xfs, tmpfs on Linux 6.6+)")


def credentials(cfg: DoctorConfig) -> list[Check]:
    try:
        found = _remote(cfg.remote).credential_source()
    except BadEndpoint:
        raise
    except LazyfsError as e:
        return [Check(FAIL, "credentials", str(e), "check AWS_PROFILE, AWS_* variables and ~/.aws files")]
    if found is None:
        return [Check(FAIL, "credentials", "none found in the AWS chain (environment, profiles, "
                      "container/IRSA roles)", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                      "AWS_PROFILE, or a role")]
    method, key = found
    return [Check(OK, "credentials", f"from {method} (access key {key})")]


_built: dict[RemoteConfig, Remote | LazyfsError] = {}


def _remote(cfg: RemoteConfig) -> Remote:
    """One client for every check, built once: building it resolves the
    credentials, which a hung source makes wait 5 s plus --read-timeout,
    once, not once a check; a failure is kept and raised to each check."""
    if cfg not in _built:
        try:
            _built[cfg] = Remote(cfg)
        except BadEndpoint:  # the profile's: exit 2 in one line, as the environment's (cli.py)
            raise
        except LazyfsError as e:
            _built[cfg] = e
    built = _built[cfg]
    if isinstance(built, LazyfsError):
        raise again(built)
    return built


def _client(cfg: DoctorConfig, name: str) -> Remote | Check:
    """The client, or the line saying why `name` was not checked: no
    client can be built without credentials (their own line says why)."""
    try:
        return _remote(cfg.remote)
    except LazyfsError:
        return Check(WARN, name, "not checked: the credentials above are unusable", "fix the credentials first")


def endpoint(cfg: DoctorConfig) -> list[Check]:
    remote = _client(cfg, "endpoint")
    if isinstance(remote, Check):
        return [remote]
    url = urllib.parse.urlsplit(remote.endpoint_url)  # (remote.endpoint: as shown, its password masked)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as e:
        return [Check(FAIL, "endpoint", f"{remote.endpoint} unreachable ({e.strerror or e})",
                      "check --endpoint-url / AWS_ENDPOINT_URL, DNS, network policy and proxies")]
    return [Check(OK, "endpoint", f"{remote.endpoint} reachable")]


def sources(cfg: DoctorConfig) -> list[Check]:
    remote = _client(cfg, "folders")
    if isinstance(remote, Check):
        return [remote]
    results = []
    for source in cfg.sources:
        try:
            remote.probe(source)
            catalog = Catalog(remote, [source])
            catalog.warn_empty = False  # this check's own line says it, with the fix
            interrupt.run(catalog.refresh)
        except LazyfsError as e:
            results.append(Check(FAIL, f"bucket {source.bucket}", str(e),
                                 "check the bucket name, region, endpoint and the credentials' permissions"))
            continue
        results.append(folder(source.uri, catalog.tree))
    return results


def folder(uri: str, tree: Tree) -> Check:
    """What a folder's listing holds; its name quoted as log lines quote it
    (a folder may hold a line separator, U+2028, which is no control)."""
    return Check(OK if tree.objects else WARN, f"folder {wording.quoted(uri)}",
                 f"{wording.count(tree.objects, 'object')}, {tree.total_bytes / 2**20:.1f} MiB"
                 + _skipped(tree.skipped), "the folder is empty: check download_files_from")


def _skipped(skipped: Sequence[Skipped]) -> str:
    """What the listing leaves out, by kind, as the mount's warnings word it."""
    unsafe = sum(1 for s in skipped if s.kind == UNSAFE)
    bodies = sum(1 for s in skipped if s.kind == MARKER_BODY)
    said = []
    if unsafe:
        said.append(f"{wording.count(unsafe, 'key')} skipped as unsafe")
    if bodies:
        said.append(f"{wording.count(bodies, 'folder marker')} with a body: the folder is shown, the body is not")
    return f" ({'; '.join(said)})" if said else ""
