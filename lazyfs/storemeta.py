"""A store's own folder, `.lazyfs`: its layout version, and its private
folders for downloads (`tmp/`) and the content index (`objects/`).

Opened to write (a mount, a bake: made where missing, the layout written on
first use), or only to read (`status`: nothing made or written, so a store on
a read-only filesystem, or one the caller may read but not write, a
monitoring user's probe, is judged as a writable one).  A reader that may not
enter a private folder (the daemon's, 0700) is told which, rather than
failing: what is in it is then out of its sight.

All functions block: call them from worker threads or before the mount.
"""

from __future__ import annotations

import errno
import os
from typing import Callable

from lazyfs.errors import StoreError
from lazyfs.exhausted import DESCRIPTOR_ERRNOS, strerror
from lazyfs.layer import FILE_FLAGS, PRIVATE, Layer, Permissions, write_small
from lazyfs.namespace import RESERVED_NAME

LAYOUT_VERSION = "1"
LAYOUT = "layout"

# Keeps a descriptor open for as long as the store is (Store._keep).
Keep = Callable[[int], int]


def open_to_write(root: Layer, permissions: Permissions, keep: Keep) -> tuple[int, int, int]:
    """The descriptors of `.lazyfs`, `tmp/` and `objects/`, made where missing,
    after checking (or writing) the layout version."""
    try:
        meta_fd = keep(root.open_dir([RESERVED_NAME], create=True, mode=permissions.folder))
        # Downloads in progress and the index are private to the daemon.
        tmp_fd = keep(root.open_dir([RESERVED_NAME, "tmp"], create=True, mode=PRIVATE))
        objects_fd = keep(root.open_dir([RESERVED_NAME, "objects"], create=True, mode=PRIVATE))
    except OSError as e:
        if e.errno in DESCRIPTOR_ERRNOS:  # it may well be writable: not said so
            raise StoreError(f"cannot open store {root.path}: {strerror(e)}", e.errno) from None
        raise StoreError(f"store {root.path} is not writable: {e.strerror}", e.errno or errno.EIO) from None
    version = _read_layout(meta_fd)
    if version is None:
        # Readable as the store's files are: a reader of them checks it too.
        write_small(meta_fd, LAYOUT, (LAYOUT_VERSION + "\n").encode(), permissions.file)
    else:
        _check(root, version)
    return meta_fd, tmp_fd, objects_fd


def open_to_read(root: Layer, keep: Keep, unreadable: dict[str, str]) -> int | None:
    """The descriptor of `tmp/` where there is one this user may read, after
    checking the layout version where there is one.  Creates nothing; what
    exists but may not be read is added to `unreadable` (path in the store ->
    why)."""
    meta_fd = open_existing(root, (RESERVED_NAME,), unreadable)
    if meta_fd is None:
        return None  # a folder no lazyfs wrote to yet: nothing of ours to read
    keep(meta_fd)
    try:
        version = _read_layout(meta_fd)
    except OSError as e:  # (0600 before lazyfs wrote it per --store-mode): the files are judged all the same
        unreadable[f"{RESERVED_NAME}/{LAYOUT}"] = e.strerror or str(e)
        version = None
    if version is not None:
        _check(root, version)
    tmp_fd = open_existing(root, (RESERVED_NAME, "tmp"), unreadable)
    return None if tmp_fd is None else keep(tmp_fd)


def open_existing(layer: Layer, parts: tuple[str, ...], unreadable: dict[str, str]) -> int | None:
    """A descriptor of an existing folder of the layer, or None: missing, or
    out of this user's reach (then noted in `unreadable`)."""
    try:
        return layer.open_dir(parts)
    except FileNotFoundError:
        return None
    except OSError as e:
        unreadable["/".join(parts)] = e.strerror or str(e)
        return None


def _read_layout(meta_fd: int) -> str | None:
    """The layout version written in the store, or None where none is yet."""
    try:
        fd = os.open(LAYOUT, FILE_FLAGS, dir_fd=meta_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(64).decode(errors="replace").strip()


def _check(root: Layer, version: str) -> None:
    if version != LAYOUT_VERSION:
        raise StoreError(f"store {root.path} has layout version {version!r}; this lazyfs "
                         f"uses {LAYOUT_VERSION}: use another --store or remove "
                         f"{root.path}/{RESERVED_NAME}", errno.EINVAL)
