"""Byte sizes as a user writes them in a flag (pure): "8MiB", "512k", "10G"
read into bytes, and bytes said back the same way."""

from __future__ import annotations

import re

from lazyfs.errors import ConfigError

# At most 40 digits, which any size fits: a float made infinity of 400 (an internal error).
_SIZE_RE = re.compile(r"^\s*(\d{1,40}(?:\.\d{1,40})?)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE)
# A size all the same, with more digits than that: too large for any flag, not "not a size".
_LONG_SIZE_RE = re.compile(r"^\s*\d+(?:\.\d+)?\s*[kmgtpe]?i?b?\s*$", re.IGNORECASE)


# What an error line echoes of a size a user gave: a 5,000-digit value (a
# paste gone wrong) would bury the sentence saying what is wrong with it.
_ECHOED = 40


def echoed(text: str) -> str:
    """A size as given, for an error line: its first 40 characters, and "..." if it is longer."""
    return text if len(text) <= _ECHOED else text[:_ECHOED] + "..."


def parse_size(text: str, what: str) -> int:
    """"8MiB", "512k", "10G", "1048576" -> bytes (binary multiples)."""
    m = _SIZE_RE.match(text)
    if not m and _LONG_SIZE_RE.match(text):
        raise ConfigError(f"{what}: \"{echoed(text)}\" is too large a size (examples: 8MiB, 512K, 10G)")
    if not m:
        raise ConfigError(f"{what}: \"{echoed(text)}\" is not a size (examples: 8MiB, 512K, 10G)")
    mult = 1024 ** " kmgtpe".index((m.group(2) or " ").lower())
    return int(float(m.group(1)) * mult)


def flag_size(nbytes: int) -> str:
    """Bytes as a size flag takes them: "8MiB", "5GiB", "1PiB", "3000"."""
    for unit, n in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes and nbytes % n == 0:
            return f"{nbytes // n}{unit}"
    return str(nbytes)
