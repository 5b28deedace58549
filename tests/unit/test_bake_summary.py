"""`lazyfs bake`'s last line: linked files said apart from current ones."""

from __future__ import annotations

from lazyfs.bake import BakeResult, summary


def result(**kw: int) -> BakeResult:
    values = {"files": 6, "downloaded": 0, "skipped": 0, "linked": 0, "bytes_downloaded": 0}
    values.update(kw)
    return BakeResult(failed=[], seconds=1.5, **values)


def test_files_linked_from_identical_copies_are_not_called_already_current() -> None:
    assert summary(result(linked=6), "/opt/store", None) == (
        "lazyfs bake: 6 files: 0 downloaded (0.0 MiB), 6 linked from identical copies, 0 already current, "
        "0 failed, in 1.5 s -> /opt/store")


def test_without_linked_files_the_line_is_as_it_was() -> None:
    assert summary(result(files=1, downloaded=1, bytes_downloaded=3 << 20), "/s", None) == (
        "lazyfs bake: 1 file: 1 downloaded (3.0 MiB), 0 already current, 0 failed, in 1.5 s -> /s")


def test_after_a_failure_the_bytes_fetched_in_all_are_said_apart_from_those_kept() -> None:
    failed = BakeResult(files=2, downloaded=1, skipped=0, linked=0, failed=[("s3://b/a.bin", "changed")],
                        bytes_downloaded=100, seconds=1.5, bytes_fetched=(4 << 20) + 100)
    assert summary(failed, "/s", None) == (
        "lazyfs bake: 2 files: 1 downloaded (0.0 MiB; 4.0 MiB fetched in all), 0 already current, 1 failed, "
        "in 1.5 s -> /s")


def test_files_whose_content_nothing_could_check_are_said() -> None:
    """A bake of files only their size could be checked for (SSE-KMS, no
    checksum, multipart part sizes the store cannot say) exits 0 as before,
    but its line no longer reads as if every file had been verified."""
    assert summary(result(files=3, downloaded=3, bytes_downloaded=3 << 20, unverified=2), "/s", None) == (
        "lazyfs bake: 3 files: 3 downloaded (3.0 MiB; 2 unverified: size checked, not content), 0 already current, "
        "0 failed, in 1.5 s -> /s")
