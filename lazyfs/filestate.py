"""The one vocabulary for what is on local disk for an object version, from
the store to the `user.lazyfs.state` attribute to `lazyfs status`."""

from __future__ import annotations

import enum


class FileState(str, enum.Enum):
    CACHED = "cached"  # a copy recorded as this version (fetched by lazyfs, or baked)
    PREBAKED = "prebaked"  # an unrecorded copy of the right size (the seed's rule)
    DOWNLOADING = "downloading"  # a download of this version is running (mounts only)
    PARTIAL = "partial"  # an interrupted download of this version, resumable
    STALE = "stale"  # only another version is on disk
    MISSING = "missing"  # nothing on disk

    @property
    def ready(self) -> bool:
        """Served from disk without a download."""
        return self in (FileState.CACHED, FileState.PREBAKED)

    def __str__(self) -> str:
        return self.value
