"""`lazyfs status`: per file, its remote size and local state, and totals.

Usable as a readiness probe: with `--require-all` it exits 1 while any file is
not on disk and current.  States (filestate.FileState): cached (a recorded
copy of this version), prebaked (an unrecorded copy of the right size),
downloading (a mount is fetching it), partial (an interrupted download),
stale (only another version), missing.

Against a plain store folder it lists the object store (or, when that is
unreachable, the listing the store saved) and looks at the disk.  Against a
running lazyfs mount it asks the mount itself (the `user.lazyfs.state`
extended attributes), since the store beneath it is out of reach.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import TextIO

import trio

from lazyfs.catalog import Catalog, offline_objects
from lazyfs.config import StatusConfig
from lazyfs.errors import RemoteUnavailable
from lazyfs.filestate import FileState
from lazyfs.mounttab import find_mount
from lazyfs.namespace import RemoteObject
from lazyfs.remote import Remote
from lazyfs.store import Store


@dataclass(frozen=True)
class FileStatus:
    path: str
    size: int
    state: FileState


def run(cfg: StatusConfig, out: TextIO = sys.stdout) -> int:
    entry = find_mount(cfg.store)
    if entry is not None and entry.fstype == "fuse.lazyfs":
        files, note, live = from_mount(cfg), f"as served by the lazyfs mount at {cfg.store}", True
    else:
        files, note, live = from_store(cfg)
    # Nothing known is only "ready" when the object store itself says there is nothing.
    ready = all(f.state.ready for f in files) and (live or bool(files))
    report(files, note, ready, cfg.as_json, out)
    return 1 if cfg.require_all and not ready else 0


def from_store(cfg: StatusConfig) -> tuple[list[FileStatus], str, bool]:
    store = Store.open(str(cfg.store), [str(p) for p in cfg.prebaked])
    try:
        try:
            objects = trio.run(_list, Remote(cfg.remote), cfg)
            note, live = f"store {cfg.store}, listing from the object store", True
        except RemoteUnavailable as e:
            objects = offline_objects(store, cfg.sources)
            note, live = f"store {cfg.store}, object store unreachable ({e}): last saved listing", False
        files = []
        for obj in objects:
            files.append(FileStatus(obj.key, obj.size, store.local_state(obj).state))
        return files, note, live
    finally:
        store.close()


async def _list(remote: Remote, cfg: StatusConfig) -> list[RemoteObject]:
    catalog = Catalog(remote, cfg.sources)  # no store: status never writes
    await catalog.refresh()
    return list(catalog.tree.files())


def from_mount(cfg: StatusConfig) -> list[FileStatus]:
    files = []
    for source in cfg.sources:
        top = cfg.store / source.prefix
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    state = FileState(os.getxattr(path, "user.lazyfs.state").decode())
                    size = os.stat(path).st_size
                except (OSError, ValueError):
                    continue
                files.append(FileStatus(os.path.relpath(path, cfg.store), size, state))
    return files


def report(files: list[FileStatus], note: str, ready: bool, as_json: bool, out: TextIO) -> None:
    counts = {s.value: sum(1 for f in files if f.state is s) for s in FileState}
    total = sum(f.size for f in files)
    if as_json:
        rows = [{"path": f.path, "size": f.size, "state": f.state.value} for f in files]
        json.dump({"files": rows, "totals": {"files": len(files), "bytes": total, **counts}, "ready": ready,
                   "source": note}, out, indent=2)
        out.write("\n")
        return
    width = max([len(f"{f.size:,}") for f in files] + [4])
    print(f"{'STATE':<11} {'SIZE':>{width}}  PATH", file=out)
    for f in files:
        print(f"{f.state.value:<11} {f.size:>{width},}  {f.path}", file=out)
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    print(f"{len(files)} files, {total / 2**20:.1f} MiB: {summary} "
          f"({'ready' if ready else 'not ready'}; {note})", file=out)
