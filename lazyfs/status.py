"""`lazyfs status`: per file, its remote size and local state, and totals.

Usable as a readiness probe: with `--require-all` it exits 1 while any file is
not on disk and current, and whenever it cannot know that every file is: a
mount whose listing never succeeded, a mount without xattrs (--no-xattrs)
that cannot tell file states, an unreadable stats file, folders (--config,
--prefix) the running mount does not serve.  Each says why in one line.
States (filestate.FileState): cached (a recorded copy of this version),
prebaked (an unrecorded copy of the right size), downloading (a mount is
fetching it), partial (an interrupted download), stale (only another
version), missing.

Against a plain store folder it lists the object store (or, when that is
unreachable, the listing the store saved) and looks at the disk, writing
nothing (Store.open_to_read): a read-only store, or one this user may read
but not write, is judged as a writable one.  Against a
running lazyfs mount it asks the mount itself (every file's state in one read
of its `.lazyfs/states.json`, statesfile.py; of a mount that has none, each
file's `user.lazyfs.state` extended attribute), since the store beneath it is
out of reach.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from lazyfs import contentcheck, interrupt, storelook, wording
from lazyfs.catalog import Catalog
from lazyfs.config import StatusConfig
from lazyfs.errors import ConfigError, RemoteUnavailable, StoreError
from lazyfs.filestate import FileState
from lazyfs.identity import SIDECAR_FOLDER
from lazyfs.modeljson import Source, build_sources
from lazyfs.mounttab import find_mount
from lazyfs.namespace import RESERVED_NAME, RemoteObject
from lazyfs.offline import offline_objects
from lazyfs.remote import Remote
from lazyfs.statusreport import Answer, FileStatus, report
from lazyfs.store import Store

_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)
_SIDECAR_NOTE = "identity records in sidecar files: the store's filesystem keeps no user xattrs"


def run(cfg: StatusConfig, out: TextIO = sys.stdout) -> int:
    entry = find_mount(cfg.store)
    if entry is not None and entry.fstype == "fuse.lazyfs":
        answer = from_mount(cfg)
    else:
        answer = from_lock(cfg) if cfg.lock is not None else from_store(cfg)
    report(answer, cfg.as_json, out)
    return 1 if cfg.require_all and not answer.ready else 0


def from_lock(cfg: StatusConfig) -> Answer:
    """Judge the store against a lock: no listing, no request.  `cached` is a
    copy whose identity record names the locked version; with --verify
    content, every copy on disk is hashed against the lock's checksum."""
    assert cfg.lock is not None
    lock = cfg.lock
    store = Store.open_to_read(str(cfg.store), [str(p) for p in cfg.prebaked])
    try:
        entries = list(lock.entries())
        files, unchecked = _local_files(store, [e.obj() for e in entries])
        if cfg.verify_content:
            files = _with_content(files, contentcheck.against_lock(store, entries, _on_disk(files)))
    finally:
        store.close()
    how = "by content" if cfg.verify_content else "by identity record"
    note = f"store {cfg.store} against lock {lock.path} ({lock.short_digest}), {how}" + _out_of_sight(store)
    return Answer(files, note, _records_unread(store) or unchecked or _unproven(files, cfg.verify_content),
                  lock.short_digest)


def _out_of_sight(store: Store) -> str:
    """What of the store this user may not read (status only reads, so a
    store it may not write is judged all the same), for the note."""
    if not store.unreadable:
        return ""
    said = ", ".join(f"{path} ({why})" for path, why in sorted(store.unreadable.items()))
    return f"; this user cannot read {said}: run status as the store's owner to see all of it"


def _records_unread(store: Store) -> str:
    """Why no file's state can be trusted: identity records this user may not read."""
    why = store.unreadable.get("/".join(SIDECAR_FOLDER))
    return f"the identity records in {'/'.join(SIDECAR_FOLDER)} cannot be read by this user ({why})" if why else ""


def _on_disk(files: list[FileStatus]) -> set[str]:
    return {f.path for f in files if f.state.ready}


def _with_content(files: list[FileStatus], results: dict[str, str]) -> list[FileStatus]:
    """The files with what hashing them found: bytes that are not the locked
    version's are `stale` (only another version is on disk)."""
    out = []
    for f in files:
        found = results.get(f.path, "")
        state = FileState.STALE if found == "differs" else f.state
        out.append(dataclasses.replace(f, state=state, content=found))
    return out


def _unproven(files: list[FileStatus], content: bool) -> str:
    """Files on disk that cannot be shown to be the locked version."""
    bare = sum(1 for f in files if f.state is FileState.PREBAKED and f.content != "match")
    if bare:
        one = bare == 1
        return (f"{wording.count(bare, 'file')} {'has' if one else 'have'} no identity record to prove "
                f"{'it is' if one else 'they are'} the locked version"
                + ("" if content else f" (--verify content checks {'its' if one else 'their'} bytes)"))
    return ""


def from_store(cfg: StatusConfig) -> Answer:
    store = Store.open_to_read(str(cfg.store), [str(p) for p in cfg.prebaked])
    try:
        unknown = ""
        try:
            objects = interrupt.run(_list, Remote(cfg.remote), cfg)
            note = f"store {cfg.store}, listing from the object store"
        except RemoteUnavailable as e:
            objects = offline_objects(store, cfg.sources)
            note = (f"store {cfg.store}, object store unreachable ({e}): what the store knows (a saved listing, "
                    "if any, and the files on disk)")
            if not objects:  # nothing known is only "ready" when the object store says there is nothing
                unknown = "the object store is unreachable and the store knows no files"
        if not store.identities.supported:
            note += f"; {_SIDECAR_NOTE}"
        files, unchecked = _local_files(store, objects)
        return Answer(files, note + _out_of_sight(store), unknown or _records_unread(store) or unchecked)
    finally:
        store.close()


async def _list(remote: Remote, cfg: StatusConfig) -> list[RemoteObject]:
    catalog = Catalog(remote, cfg.sources)  # no store: status never writes
    await catalog.refresh()
    return list(catalog.tree.files())


def from_mount(cfg: StatusConfig) -> Answer:
    """Ask a running mount: its stats file for the listing, then its states
    file (or each file's `user.lazyfs.state` attribute)."""
    note = f"as served by the lazyfs mount at {cfg.store}"
    try:
        stats = json.loads((cfg.store / RESERVED_NAME / "stats.json").read_bytes())
        if not isinstance(stats, dict):
            raise ValueError("not a JSON object")
    except PermissionError as e:  # nothing of the mount can be read: no table of "0 files"
        raise StoreError(f"cannot read the lazyfs mount at {cfg.store} as this user ({e.strerror}): it was "
                         "mounted without --allow-other, so only its own user may read it; run status as "
                         "that user, or mount with --allow-other", e.errno or errno.EACCES) from None
    except (OSError, ValueError) as e:
        return Answer([], note, f"cannot read the mount's {RESERVED_NAME}/stats.json ({e})")
    listing = stats.get("listing") or {}
    if listing.get("offline"):
        note += (f"; offline, the object store cannot be asked ({listing.get('error')}): the mount serves what its "
                 "store knows (a saved listing, if any, and the files on disk)")
    if (stats.get("store_filesystem") or {}).get("user_xattrs") is False:
        note += f"; {_SIDECAR_NOTE}"
    note += _pinned_note(stats.get("pinned"))
    asked = cfg.sources
    if not cfg.sources:  # no --config, --prefix or --lock: the folders the mount serves
        cfg = dataclasses.replace(cfg, sources=_served(stats))
    unknown = _listing_unknown(stats) or _other_lock(cfg, stats.get("pinned")) or _unserved(cfg, asked, stats)
    if buckets := {s.bucket for s in _served(stats)}:  # the mount's files are keys: none of another bucket's
        cfg = dataclasses.replace(cfg, sources=tuple(s for s in cfg.sources if s.bucket in buckets))
    files, unasked = _ask_files(cfg, stats)
    if cfg.lock is not None and cfg.verify_content:
        files = _with_content(files, contentcheck.through_mount(cfg.store, list(cfg.lock.entries()),
                                                                _on_disk(files)))
    pinned = stats.get("pinned")
    return Answer(files, note, unknown or unasked or _missing_files(cfg, stats, len(files))
                  or (_unproven(files, cfg.verify_content) if cfg.lock is not None else ""),
                  cfg.lock.short_digest if cfg.lock is not None else "",
                  str(pinned.get("digest") or "") if isinstance(pinned, dict) else "")


def _served(stats: dict[str, Any]) -> tuple[Source, ...]:
    """The folders a mount says it serves (its stats file), as sources."""
    try:
        return build_sources([], [uri for uri in stats.get("sources") or () if isinstance(uri, str)], None)
    except ConfigError:
        return ()  # (a stats file that names none: nothing to walk)


def _unserved(cfg: StatusConfig, asked: tuple[Source, ...], stats: dict[str, Any]) -> str:
    """The folders asked about (--config, --prefix) that the mount does not
    serve, or "": none of their files is on it, so "0 missing" proves nothing
    (a typo in the prefix, the wrong model.json).  A folder inside a served
    one is served if the mount has it."""
    served = _served(stats)

    def on_mount(s: Source) -> bool:
        return any(s.bucket == t.bucket and s.prefix.startswith(t.prefix) for t in served) and \
            (s in served or os.path.isdir(cfg.store / s.prefix))

    unserved = [s.uri for s in asked if not on_mount(s)]
    if not unserved:
        return ""
    return (f"the mount serves {', '.join(s.uri for s in served) or 'no folder it names'}, "
            f"not {', '.join(unserved)}")


def _pinned_note(pinned: Any) -> str:
    """What the mount says of the lock it serves, and of the bucket's drift since."""
    if not isinstance(pinned, dict):
        return ""
    files = pinned.get("files")
    counted = wording.count(files, "file") if isinstance(files, int) else f"{files} files"
    note = f"; pinned to lock {str(pinned.get('digest'))[:19]} ({counted})"
    drift = pinned.get("drift") or {}
    if drift.get("checked_at"):
        note += (f"; drift since the lock: {drift.get('changed')} changed, {drift.get('deleted')} deleted, "
                 f"{drift.get('added')} added (checked {drift.get('checked_at')})")
    else:
        note += "; drift not checked yet (every --refresh seconds, or on SIGHUP)"
    if pinned.get("unavailable"):
        note += f"; {wording.count(len(pinned['unavailable']), 'locked file')} the bucket no longer has"
    return note


def _other_lock(cfg: StatusConfig, pinned: Any) -> str:
    """With --lock: why the mount does not serve that very lock, or ""."""
    if cfg.lock is None:
        return ""
    if not isinstance(pinned, dict):
        return f"the mount is not pinned (started without --lock), so it cannot prove {cfg.lock.path}"
    if pinned.get("digest") != cfg.lock.digest:
        return f"the mount serves lock {str(pinned.get('digest'))[:19]}, not {cfg.lock.short_digest}"
    return ""


def _listing_unknown(stats: dict[str, Any]) -> str:
    """Why the mount's tree does not name every file, or ""."""
    listing = stats.get("listing") or {}
    if listing.get("state") == "saved":  # S3 answers, with errors: what it holds now is unknown
        return (f"the mount serves the store's saved listing; its first listing failed "
                f"({listing.get('error') or 'an error'}) and is being retried")
    if listing.get("ok") or stats.get("objects"):
        return ""  # listed, or serving an earlier listing (or, offline, what the store knows)
    if not listing.get("last_at"):
        return "the mount's first listing has not finished"
    return f"the mount has no listing: {listing.get('error') or 'its first listing failed'}"


def _ask_files(cfg: StatusConfig, stats: dict[str, Any]) -> tuple[list[FileStatus], str]:
    """Every file's state, from the mount's states.json (one read: statesfile.py); where the mount has
    none to give (an older lazyfs, --no-xattrs, no listing yet), asked of each file in a walk."""
    try:
        rows = _states_file(cfg.store / RESERVED_NAME / "states.json")
    except OSError as e:
        return [], f"cannot read the mount's {RESERVED_NAME}/states.json ({e.strerror or e})"
    except ValueError as e:
        return [], f"cannot read the mount's {RESERVED_NAME}/states.json ({e})"
    if rows is None:
        return _walk_files(cfg, stats)
    files, failed, why = [], 0, ""
    for source in cfg.sources:  # (as the walk saw them: each folder's files, then its folders', sorted)
        for key, size, state, verified in sorted((r for r in rows if r[0].startswith(source.prefix)), key=_walk_order):
            if state is None:  # (`verified`: why, from a lazyfs that says it: the daemon's descriptor limit, say)
                failed, why = failed + 1, why or str(verified or "")
                continue
            files.append(FileStatus(key, size, FileState(state), verified or ""))
    return files, _unasked(failed) + (f" ({why})" if failed and why else "")


def _states_file(path: Path) -> list[tuple[str, int, str | None, str | None]] | None:
    """The rows of a mount's states.json, or None when it has none to give."""
    try:
        got = json.loads(path.read_bytes())
    except OSError as e:
        if e.errno in (errno.ENOENT, *_NO_XATTRS):
            return None
        raise
    if not isinstance(got, dict) or not isinstance(got.get("files"), list):
        raise ValueError("not what lazyfs writes there")
    if not got.get("listed"):
        return None
    rows = []
    try:
        for key, size, state, verified in got["files"]:
            if state is not None:
                FileState(state)  # (ValueError: a state this lazyfs does not know)
            rows.append((str(key), int(size), state, verified))
    except TypeError as e:
        raise ValueError(f"a row not as lazyfs writes it: {e}") from None
    return rows


def _walk_order(row: tuple[str, int, str | None, str | None]) -> tuple[tuple[str, ...], str]:
    """os.walk's order, top-down with names sorted: a folder's files, then each of its folders' in turn."""
    *folders, name = row[0].split("/")
    return tuple(folders), name


def _walk_files(cfg: StatusConfig, stats: dict[str, Any]) -> tuple[list[FileStatus], str]:
    files: list[FileStatus] = []
    failed = 0
    for source in cfg.sources:
        top = cfg.store / source.prefix
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    state = FileState(os.getxattr(path, "user.lazyfs.state").decode())
                    verified = _xattr(path, "user.lazyfs.verified")
                    size = os.stat(path).st_size
                except OSError as e:
                    if e.errno in _NO_XATTRS:
                        return files, _no_xattrs(cfg, stats)
                    failed += 1
                    continue
                except ValueError:
                    failed += 1
                    continue
                files.append(FileStatus(os.path.relpath(path, cfg.store), size, state, verified))
    return files, _unasked(failed)


def _unasked(failed: int) -> str:
    return (f"{wording.count(failed, 'file')} could not be asked for {'its' if failed == 1 else 'their'} state"
            if failed else "")


def _local_files(store: Store, objs: list[RemoteObject]) -> tuple[list[FileStatus], str]:
    """The files' states, and why any could not be checked (storelook.py: not `missing`)."""
    looked, unchecked = storelook.look(store, objs)
    return [FileStatus(o.key, o.size, s.state, s.verified if s.state.ready else "") for o, s in looked], unchecked


def _xattr(path: str, name: str) -> str:
    """An attribute of lazyfs's a mount may not have (an older lazyfs): ""."""
    try:
        return os.getxattr(path, name).decode()
    except OSError as e:
        if e.errno in _NO_XATTRS:
            raise
        return ""


def _no_xattrs(cfg: StatusConfig, stats: dict[str, Any]) -> str:
    store = str(stats.get("store") or "")
    if store and os.path.abspath(store) != os.path.abspath(cfg.store):
        return f"the mount was started with --no-xattrs and cannot tell file states: ask its store (--store {store})"
    return "the mount was started with --no-xattrs and cannot tell file states (its store is beneath it)"


def _missing_files(cfg: StatusConfig, stats: dict[str, Any], found: int) -> str:
    """The mount knows more files than the walk found (same folders only)."""
    listed = stats.get("objects")
    if sorted(stats.get("sources") or ()) != sorted(s.uri for s in cfg.sources) or not isinstance(listed, int):
        return ""
    return f"the mount lists {wording.count(listed, 'file')}, {found} were found" if found < listed else ""
