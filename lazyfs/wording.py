"""How lazyfs words what it prints (pure): counts ("1 file", "2 files"),
sizes ("6.0 MiB"), and text from files and listings kept on one line."""

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


def cause(message: str, subject: str) -> str:
    """`message`, an error's text naming `subject` (a quoted key), for a line
    that names `subject` itself ("download of SUBJECT failed: ..."): so the
    line names it once.  A leading "SUBJECT: " is dropped and SUBJECT elsewhere
    is "it" ("access denied to it (AccessDenied: ...)")."""
    return message.removeprefix(subject + ": ").replace(subject, "it")


def _escaped(ch: str) -> str:
    if ch in '"\\':
        return "\\" + ch
    return repr(ch)[1:-1]  # "\n", "\x1b", "\u2028", "\udcff" (a byte of a name that is not UTF-8)


def sizes(*nbytes: int) -> tuple[str, ...]:
    """Byte counts in MiB with one decimal, to be read side by side; with
    their exact bytes as well where that rounding would make different counts
    look the same ("needs 6.0 MiB but ... has 6.0 MiB free" said nothing)."""
    rounded = tuple(f"{n / 2**20:.1f} MiB" for n in nbytes)
    if len(set(rounded)) < len(set(nbytes)):
        return tuple(f"{r} ({n:,} bytes)" for r, n in zip(rounded, nbytes, strict=True))
    return rounded
