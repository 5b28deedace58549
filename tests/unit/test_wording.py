"""Counts in what lazyfs prints: one file, never "1 files"."""

from __future__ import annotations

import pytest

from lazyfs.wording import count


@pytest.mark.parametrize("n, said", [(0, "0 files"), (1, "1 file"), (2, "2 files"), (10000, "10000 files")])
def test_a_count_of_one_is_singular(n: int, said: str) -> None:
    assert count(n, "file") == said


def test_an_irregular_plural_is_given() -> None:
    assert (count(1, "entry", "entries"), count(3, "entry", "entries")) == ("1 entry", "3 entries")
