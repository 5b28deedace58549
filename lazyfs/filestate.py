"""The one vocabulary for what is on local disk for an object version, from
the store to the `user.lazyfs.state` attribute to `lazyfs status`, and the
store's answers in it (LocalState, LocalCopy)."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Callable

from lazyfs.layer import Layer
from lazyfs.namespace import RemoteObject


class FileState(str, enum.Enum):
    CACHED = "cached"  # a copy recorded as this version (fetched by lazyfs, or baked)
    # An unrecorded copy of the right size (the seed's rule); on a pinned
    # mount, served only once its content matched the lock (probe.PrebakedCheck).
    PREBAKED = "prebaked"
    DOWNLOADING = "downloading"  # a download of this version is running (a mount's or a bake's: it holds the lock)
    PARTIAL = "partial"  # an interrupted download of this version, resumable
    STALE = "stale"  # only another version is on disk
    MISSING = "missing"  # nothing on disk

    @property
    def ready(self) -> bool:
        """Served from disk without a download."""
        return self in (FileState.CACHED, FileState.PREBAKED)

    def __str__(self) -> str:
        return self.value


# How a copy with no identity record was judged: by its size (the seed's rule).
SIZE = "size"
# How a copy was checked whose record an older lazyfs wrote, before records said how (Identity.verified "").
UNRECORDED = "unknown"
# How the content of an unrecorded copy was checked this run, if it was
# (probe.PrebakedCheck.checked, --verify etag or a pinned mount): a copy in a
# read-only layer cannot be stamped, so the mount remembers.  "" when it was
# not checked, REJECTED when it was and is not served (its bytes differ, or
# on a pinned mount nothing but its size could vouch for it).
ContentChecks = Callable[[RemoteObject, Layer, os.stat_result], str]
REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class LocalState:
    state: FileState
    layer: str  # which layer holds it ("store", "prebaked layer"), or ""
    bytes: int  # bytes of this version on disk
    # How a cached copy's content was checked (identity.Identity.verified);
    # SIZE for a prebaked copy judged by its size.
    verified: str = ""


@dataclass(slots=True)
class LocalCopy:
    """An open, current local copy of an object."""

    fd: int
    layer: Layer
    state: FileState  # CACHED or PREBAKED
    dev: int = 0  # st_dev of its filesystem, for passthrough.py (which must not stat on the trio thread)
    linked: bool = False  # made just now from the same bytes under another path (Store.materialise)
    # A file lazyfs fetched (identity origin "fetch"), which the cache budget
    # counts: known for a copy just linked from the same bytes (Store.materialise).
    fetched: bool = False


# Is this unrecorded copy (PREBAKED) the object's content?  Asked of each such
# copy the store finds, in layer order (probe.PrebakedCheck): False passes it
# over for the next layer's.  Blocking (it may hash the copy).
PrebakedAccept = Callable[[RemoteObject, LocalCopy], bool]
