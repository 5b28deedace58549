"""How lazyfs words what it prints (pure): counts ("1 file", "2 files"), and
text from files and listings kept on one line."""

from __future__ import annotations


def count(n: int, noun: str, plural: str = "") -> str:
    """`n` and the noun, singular for exactly one (`plural` for nouns not made with an -s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def quoted(text: str) -> str:
    """`text` (a key, a folder, a value from a user's file or an S3 listing)
    in double quotes, escaped as Python escapes it: a newline or a terminal
    escape in it can neither split an error line in two nor pass for the
    end of the quote."""
    return '"' + "".join(_escaped(ch) if ch in '"\\' or not ch.isprintable() else ch for ch in text) + '"'


def one_line(text: str) -> str:
    """`text` with every character that is not printable (newlines, tabs,
    terminal escapes) escaped: what an error line prints, whatever a message
    holds, stays one line."""
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    if ch in '"\\':
        return "\\" + ch
    return repr(ch)[1:-1]  # "\n", "\x1b", "\u2028", "\udcff" (a byte of a name that is not UTF-8)
