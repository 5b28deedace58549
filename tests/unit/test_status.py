"""Unit tests: when `lazyfs status` may say ready, from a mount's stats file."""

from __future__ import annotations

import pytest

from lazyfs.filestate import FileState
from lazyfs.status import Answer, FileStatus, _listing_unknown


@pytest.mark.parametrize("stats, unknown", [
    ({"objects": 0, "listing": {"ok": True, "last_at": "t"}}, ""),  # listed: the folder is empty
    ({"objects": 3, "listing": {"ok": False, "last_at": "t", "error": "SlowDown"}}, ""),  # an earlier listing
    ({"objects": 3, "listing": {"ok": False, "offline": True, "error": "unreachable"}}, ""),  # the saved one
    ({"objects": 0, "listing": {"ok": False, "last_at": None}}, "the mount's first listing has not finished"),
    ({"objects": 0, "listing": {"ok": False, "last_at": "t", "error": "AccessDenied"}},
     "the mount has no listing: AccessDenied"),
    ({}, "the mount's first listing has not finished"),
])
def test_a_mount_without_a_listing_is_never_ready(stats: dict, unknown: str) -> None:
    assert _listing_unknown(stats) == unknown


def test_nothing_unknown_and_every_file_on_disk_is_ready() -> None:
    cached = [FileStatus("a", 1, FileState.CACHED), FileStatus("b", 1, FileState.PREBAKED)]
    assert Answer(cached, "n").ready
    assert Answer([], "n").ready, "a listing that says there is nothing"
    assert not Answer(cached, "n", unknown="the mount was started with --no-xattrs").ready
    assert not Answer(cached + [FileStatus("c", 1, FileState.PARTIAL)], "n").ready
