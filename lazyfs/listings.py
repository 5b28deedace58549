"""What the store knows without the object store: the last complete listing
of each folder (`.lazyfs/listings/`), and the files on disk in the store and
the prebaked layers.  Together they let a restart with the object store
unreachable start *offline*.

All functions block: call them from worker threads or before the mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from lazyfs.identity import IdentityRecords
from lazyfs.layer import FILE_FLAGS, Layer, write_small
from lazyfs.namespace import RESERVED_NAME, RemoteObject

_FOLDER = (RESERVED_NAME, "listings")


@dataclass(frozen=True, slots=True)
class SavedListing:
    objects: list[RemoteObject]
    # When it was saved (the local clock): a local file it does not name is
    # a deleted object's copy, unless the object is newer than the listing.
    saved_ns: int


class SavedListings:
    def __init__(self, root: Layer) -> None:
        self.root = root

    @staticmethod
    def _name(bucket: str, prefix: str) -> str:
        return hashlib.sha256(f"{bucket}\0{prefix}".encode()).hexdigest()[:32] + ".json"

    def save(self, bucket: str, prefix: str, objects: Iterable[RemoteObject]) -> None:
        """Keep the last complete listing of a folder."""
        rows = [[o.key, o.size, o.etag, o.mtime_ns] for o in objects]
        # (an older lazyfs reads it as before: it ignores the extra member)
        head = json.dumps({"v": 1, "bucket": bucket, "prefix": prefix, "saved_ns": time.time_ns()})[:-1]
        dfd = self.root.open_dir(_FOLDER, create=True)
        try:
            write_small(dfd, self._name(bucket, prefix), f'{head}, "objects": [{_rows_json(rows)}]}}'.encode())
        finally:
            os.close(dfd)

    def load(self, bucket: str, prefix: str) -> list[RemoteObject] | None:
        saved = self.load_dated(bucket, prefix)
        return None if saved is None else saved.objects

    def load_dated(self, bucket: str, prefix: str) -> SavedListing | None:
        """The saved listing of a folder and when it was saved (None: there is none, or it cannot be read)."""
        try:
            dfd = self.root.open_dir(_FOLDER)
        except OSError:
            return None
        try:
            fd = os.open(self._name(bucket, prefix), FILE_FLAGS, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                written_ns = os.fstat(f.fileno()).st_mtime_ns  # an older lazyfs's: written once, renamed in
                doc = json.load(f)
            if doc.get("v") != 1 or doc.get("bucket") != bucket or doc.get("prefix") != prefix:
                return None
            return SavedListing([RemoteObject(bucket, str(k), int(size), str(etag), int(mtime))
                                 for k, size, etag, mtime in doc["objects"]], int(doc.get("saved_ns", written_ns)))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        finally:
            os.close(dfd)


# Rows encoded per call of json.dumps: one call holds the GIL throughout (about
# 110 ms for 200,000 rows, during which the trio thread cannot run); batches
# hold it for about 2 ms each.
ROWS_PER_DUMP = 4096


def _rows_json(rows: list[list[object]]) -> str:
    """The rows as the members of a JSON array, encoded in batches."""
    return ", ".join(json.dumps(rows[i:i + ROWS_PER_DUMP])[1:-1] for i in range(0, len(rows), ROWS_PER_DUMP))


def walk_local(layers: Sequence[Layer], records: IdentityRecords, bucket: str,
               prefix: str) -> Iterator[tuple[RemoteObject, str]]:
    """Regular files under `prefix` in the layers, first layer first, as objects
    (their recorded identity, or just size and mtime) with the layer's label.
    Symlinks are not followed.  Costs a directory walk."""
    seen: set[str] = set()
    parts = [p for p in prefix.strip("/").split("/") if p]
    for layer in layers:
        try:
            top = layer.open_dir(parts)
        except OSError:
            continue
        try:
            for dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=top):
                rel = os.path.normpath(dirpath)
                if rel.split("/", 1)[0] == RESERVED_NAME:
                    continue
                for name in files:
                    key = "/".join(parts + ([] if rel == "." else [rel]) + [name])
                    obj = _local_object(records, layer, dfd, name, key, bucket)
                    if obj is not None and key not in seen:
                        seen.add(key)
                        yield obj, layer.label
        finally:
            os.close(top)


def _local_object(records: IdentityRecords, layer: Layer, dfd: int, name: str, key: str,
                  bucket: str) -> RemoteObject | None:
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dfd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        ident = records.read(fd, layer, st)
        if ident is not None and ident.size == st.st_size:
            return RemoteObject(ident.bucket, key, ident.size, ident.etag, ident.mtime_ns)
        return RemoteObject(bucket, key, st.st_size, "", st.st_mtime_ns)
    finally:
        os.close(fd)
