"""Counts in what lazyfs prints: one file, never "1 files"; and a key or
path from a file or a listing printed on one line, whatever it holds."""

from __future__ import annotations

import pytest

from lazyfs.wording import cause, count, one_line, quoted, sizes


@pytest.mark.parametrize("n, said", [(0, "0 files"), (1, "1 file"), (2, "2 files"), (10000, "10000 files")])
def test_a_count_of_one_is_singular(n: int, said: str) -> None:
    assert count(n, "file") == said


def test_an_irregular_plural_is_given() -> None:
    assert (count(1, "entry", "entries"), count(3, "entry", "entries")) == ("1 entry", "3 entries")


@pytest.mark.parametrize("text, shown", [
    ("models/a b.bin", '"models/a b.bin"'), ("m/a\nb.bin", r'"m/a\nb.bin"'), ("\x1b[2J", r'"\x1b[2J"'),
    ('say "hi"\\', r'"say \"hi\"\\"'), ("é\u2028\x85", r'"é\u2028\x85"'), ("a\udcffb", r'"a\udcffb"'),
])
def test_quoted_text_stays_on_one_line(text: str, shown: str) -> None:
    assert quoted(text) == shown
    assert len(quoted(text).splitlines()) == 1


@pytest.mark.parametrize("ch", [chr(c) for c in range(0x80, 0xA0)] + ["\u2028", "\u2029", "\x1c", "\x0b"])
def test_quoted_escapes_every_c1_control_and_line_separator(ch: str) -> None:
    shown = quoted(f"models/a{ch}b.bin")
    assert ch not in shown and shown == '"models/a' + repr(ch)[1:-1] + 'b.bin"'
    assert shown.splitlines() == shown.split("\n") == [shown]


def test_one_line_escapes_only_what_is_not_printable() -> None:
    assert one_line('lock a "b" é: x') == 'lock a "b" é: x'
    assert one_line("a\nb\tc\r\x00") == r"a\nb\tc\r\x00"


def test_sizes_side_by_side_show_their_bytes_when_rounding_makes_them_look_equal() -> None:
    assert sizes(6 << 20, 6 << 20) == ("6.0 MiB", "6.0 MiB")
    assert sizes(10 << 20, 6 << 20) == ("10.0 MiB", "6.0 MiB")
    assert sizes(6 << 20, (6 << 20) - 4096) == ("6.0 MiB (6,291,456 bytes)", "6.0 MiB (6,287,360 bytes)")


@pytest.mark.parametrize("message, said", [
    ('"s3://b/k": object store kept failing (SlowDown: x)', "object store kept failing (SlowDown: x)"),
    ('access denied to "s3://b/k" (AccessDenied: x)', "access denied to it (AccessDenied: x)"),
    ('"s3://b/k" changed in the object store', "it changed in the object store"),
    ("sha256:16c5d pins ETag 5f1c, which the bucket no longer has", "sha256:16c5d pins ETag 5f1c, which the bucket "
     "no longer has"),
    ('"s3://b/k": the store did not answer about "s3://b/k2"', 'the store did not answer about "s3://b/k2"'),
])
def test_a_cause_names_its_subject_no_more_where_the_line_names_it(message: str, said: str) -> None:
    assert cause(message, '"s3://b/k"') == said
