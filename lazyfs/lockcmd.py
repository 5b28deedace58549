"""`lazyfs lock` and `lazyfs diff`: making a lock of the configured folders,
and what a switch from one lock to another downloads (what_switch: pure).

A lock is made from one listing and one HEAD per object (with ChecksumMode:
the listing names no checksum values, and no version ids), so it records
what the object store vouches for: the object's additional full-object
checksum if it has one, else its ETag as an MD5 (single part) or as a
multipart ETag with the part sizes the store confirms (verify.choose, as a
download is checked).  The HEADs run in worker threads, LOCK_HEADS at once.
Never imports pyfuse3.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

import trio

from lazyfs import __version__, interrupt, lockfile, verify, wording
from lazyfs.catalog import Catalog
from lazyfs.config import DiffConfig, LockConfig, Source
from lazyfs.errors import Interrupted, LazyfsError, ObjectNotFound
from lazyfs.lockfile import ConfigRef, Entry, Folder, Lock
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import ObjectStore
from lazyfs.threads import run_sync

log = logging.getLogger(__name__)

# HEADs in flight while a lock is made: a 10,000-file folder locks in seconds,
# well within botocore's connection pool (config.remote_config).
LOCK_HEADS = 16


def run(cfg: LockConfig, out: TextIO = sys.stdout) -> int:
    from lazyfs.remote import Remote  # boto3: only for the commands that talk to S3

    making = Making()
    try:
        lock = interrupt.run(make_lock, Remote(cfg.remote), cfg.sources, cfg.configs, making)
    except Interrupted as e:
        e.unfinished = "no lock written"
        raise
    write(lock, cfg.output, sys.stdout)
    print(summary(lock, cfg.output, making), file=out if cfg.output is not None else sys.stderr, flush=True)
    return 0


@dataclass
class Making:
    """What making a lock found besides the lock, for its summary line."""

    # Keys whose object changed between the listing and their HEAD: the
    # version locked is the one found last, maybe not the one approved.
    changed: list[str] = field(default_factory=list)
    # Bucket -> its versioning (ObjectStore.versioning), asked of the buckets
    # of files pinned by ETag alone: does an overwrite lose them?
    versioning: dict[str, str | None] = field(default_factory=dict)


async def make_lock(remote: ObjectStore, sources: Sequence[Source], configs: Sequence[ConfigRef],
                    making: Making | None = None) -> Lock:
    """List the folders, then HEAD every object: a lock of what they hold now.
    `making`, if given, gathers what the summary line says besides."""
    making = making if making is not None else Making()
    catalog = Catalog(remote, sources)  # no store: making a lock writes nothing but the lock
    await catalog.refresh()  # a failure is a runtime error (exit 1)
    objects = list(catalog.tree.files())
    entries: list[Entry] = []
    errors: list[LazyfsError] = []
    slots = trio.Semaphore(LOCK_HEADS)

    async def one(obj: RemoteObject, cancel: trio.CancelScope) -> None:
        try:
            # Abandoned on cancel (a failed HEAD, a stop signal): it changes nothing.
            entries.append(await run_sync(entry_of, remote, obj, making.changed, abandon_on_cancel=True))
        except LazyfsError as e:
            errors.append(e)
            cancel.cancel()  # a lock is whole or it is not written
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for obj in objects:
            await slots.acquire()
            nursery.start_soon(one, obj, nursery.cancel_scope)
    if errors:
        raise errors[0]
    for bucket in sorted({e.bucket for e in entries if not e.version_id}):
        making.versioning[bucket] = await run_sync(remote.versioning, bucket, abandon_on_cancel=True)
    folders = [Folder(s.bucket, s.prefix, tuple(e for e in entries if e.bucket == s.bucket
                                                 and e.key.startswith(s.prefix))) for s in sources]
    return lockfile.make(folders, configs, f"lazyfs {__version__}")


def entry_of(remote: ObjectStore, listed: RemoteObject, changed: list[str] | None = None) -> Entry:
    """The lock entry of one listed object, from a HEAD (blocking: a worker
    thread); its key added to `changed` if the HEAD found another version."""
    try:
        info = remote.head(listed.bucket, listed.key)
    except ObjectNotFound:
        raise ObjectNotFound(f"{wording.quoted(listed.uri)} was deleted while the lock was being made; "
                             "run lazyfs lock again",
                             bucket=listed.bucket, key=listed.key) from None
    obj = dataclasses.replace(info.obj, version_id=info.version_id)
    if not obj.same_bytes(listed):  # the bytes approved may not be these: a warning, and counted
        log.warning("%s changed while the lock was being made; locking the version found last (ETag %s)",
                    wording.quoted(obj.uri), obj.etag)
        if changed is not None:
            changed.append(obj.key)  # (one append: atomic under the GIL)
    # A lock names full-object checksums and ETags only (lockfile.CHECKSUMS, ETAG_CHECKS).
    check = verify.choose(obj.etag, info.checksum, info.etag_is_md5, obj.size, lambda n: remote.part(obj, n),
                          composite=False)
    return Entry(obj.bucket, obj.key, obj.size, obj.etag, obj.version_id, obj.mtime_ns, check)


def write(lock: Lock, path: Path | None, stdout: TextIO) -> None:
    """Write the lock file whole or not at all (a sibling renamed over it)."""
    text = lockfile.dumps(lock)
    if path is None:
        stdout.write(text)
        stdout.flush()
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # a lock names no secret; it is meant to be reviewed and shipped
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def summary(lock: Lock, path: Path | None, making: Making | None = None) -> str:
    making = making if making is not None else Making()
    pinned = sum(1 for e in lock.entries() if e.version_id)
    if lock.files and pinned == lock.files:
        how = "each pinned by its version id (the bucket keeps versions: an overwrite changes nothing)"
    else:
        why = _why_by_etag(lock, making, pinned)
        # A version null stays fetchable after an overwrite (pinned.guard asks for it by that id).
        effect = "only once the bucket no longer keeps it as version null" if why.startswith("version null") else ""
        how = (f"{pinned} by version id, {lock.files - pinned} by ETag alone ({why})" if pinned else
               f"pinned by ETag ({why}: an overwrite makes a file unavailable to a pinned mount"
               f"{' ' + effect if effect else ''}, never different)")
    unchecked = sum(1 for e in lock.entries() if e.check is None)
    note = f"; {unchecked} with nothing to check their bytes against but their size" if unchecked else ""
    if making.changed:
        n = len(making.changed)
        note += (f"; {wording.count(n, 'file')} changed while the lock was being made: "
                 f"{'its' if n == 1 else 'their'} last version is locked, maybe not the one approved")
    return (f"lazyfs lock: {_files(lock.files)}, {lock.bytes / 2**20:.1f} MiB in "
            f"{', '.join(s.uri for s in lock.sources)}, {how}{note} -> {path or 'standard output'} "
            f"({lock.short_digest})")


def _why_by_etag(lock: Lock, making: Making, pinned: int) -> str:
    """Why files of the lock have no version id: their buckets keep no
    versions, or they were written before versioning was turned on (version
    "null", which S3 keeps as an older version after an overwrite).  The
    buckets' own word where they gave it; else, as the ids alone suggest."""
    said = {making.versioning.get(e.bucket) for e in lock.entries() if not e.version_id}
    if said == {""}:
        return "the bucket keeps no versions"
    if said <= {"Enabled", "Suspended"}:
        return "version null, written before versioning was on or while it was suspended"
    return "written before versioning was on" if pinned else "the bucket keeps no versions"


# -- lazyfs diff ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """What a switch does for one file of the new lock."""

    entry: Entry
    action: str  # "same" (the same bytes at the same path), "link" (the same bytes at another path), "download"
    source_key: str = ""  # for "link": where the same bytes are in the old version


@dataclass(frozen=True)
class Switch:
    changes: tuple[Change, ...]
    removed: tuple[Entry, ...]  # served by the old lock, not by the new one

    def of(self, action: str) -> list[Change]:
        return [c for c in self.changes if c.action == action]

    def total(self, action: str) -> tuple[int, int]:
        """(files, bytes) of one action."""
        picked = self.of(action)
        return len(picked), sum(c.entry.size for c in picked)


def what_switch(old: Lock, new: Lock) -> Switch:
    """What moving a store from `old` to `new` costs: files whose bytes (ETag
    and size, as the store's content index matches them) the old version
    has are linked, not downloaded."""
    at_path = {(e.bucket, e.key): e for e in old.entries()}
    by_bytes: dict[tuple[str, int], Entry] = {}
    for e in old.entries():
        if e.etag:
            by_bytes.setdefault((e.etag, e.size), e)
    changes = []
    for e in new.entries():
        before = at_path.get((e.bucket, e.key))
        same = by_bytes.get((e.etag, e.size)) if e.etag else None
        if before is not None and (before.etag, before.size) == (e.etag, e.size) and e.etag:
            changes.append(Change(e, "same"))
        elif same is not None:
            changes.append(Change(e, "link", same.key))
        else:
            changes.append(Change(e, "download"))
    kept = {(e.bucket, e.key) for e in new.entries()}
    return Switch(tuple(changes), tuple(e for e in old.entries() if (e.bucket, e.key) not in kept))


def run_diff(cfg: DiffConfig, out: TextIO = sys.stdout) -> int:
    switch = what_switch(cfg.old, cfg.new)
    if cfg.as_json:
        json.dump(_diff_json(cfg, switch), out, indent=2)
        out.write("\n")
        return 0
    print(f"lazyfs diff: {_about(cfg.old)} -> {_about(cfg.new)}", file=out)
    rows = [(c.action, c.entry.size, c.entry.key, f"  (same bytes as {c.source_key})" if c.source_key else "")
            for c in switch.changes if c.action != "same"]
    rows += [("removed", e.size, e.key, "") for e in switch.removed]
    if rows:
        width = max(len(f"{size:,}") for _, size, _, _ in rows)
        print(f"{'ACTION':<9} {'SIZE':>{width}}  PATH", file=out)
        for action, size, key, note in rows:
            print(f"{action:<9} {size:>{width},}  {key}{note}", file=out)
    (n, size), (linked, linked_bytes) = switch.total("download"), switch.total("link")
    same = switch.total("same")[0]
    print(f"the switch downloads {_files(n)}, {size / 2**20:.1f} MiB; {_files(linked)} "
          f"({linked_bytes / 2**20:.1f} MiB) linked from the old version's copies (same ETag and size), "
          f"{_files(same)} unchanged, {_files(len(switch.removed))} of the old lock no longer served", file=out)
    return 0


def _about(lock: Lock) -> str:
    return f"{lock.path} ({lock.short_digest}, {_files(lock.files)}, {lock.bytes / 2**20:.1f} MiB)"


def _files(n: int) -> str:
    return wording.count(n, "file")


def _diff_json(cfg: DiffConfig, switch: Switch) -> dict[str, Any]:
    out: dict[str, Any] = {"old": {"path": cfg.old.path, "digest": cfg.old.digest},
                           "new": {"path": cfg.new.path, "digest": cfg.new.digest}}
    for action in ("download", "link", "same"):
        files, size = switch.total(action)
        out[action] = {"files": files, "bytes": size, "keys": [c.entry.key for c in switch.of(action)]}
    out["removed"] = {"files": len(switch.removed), "bytes": sum(e.size for e in switch.removed),
                      "keys": [e.key for e in switch.removed]}
    return out
