"""Counts in what lazyfs prints: "1 file", "2 files" (pure)."""

from __future__ import annotations


def count(n: int, noun: str, plural: str = "") -> str:
    """`n` and the noun, singular for exactly one (`plural` for nouns not made with an -s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"
