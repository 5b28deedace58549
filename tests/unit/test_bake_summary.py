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
