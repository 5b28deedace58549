"""Files a user names (a model.json, a lock): read whole, but bounded, and
parsed as JSON one strict way.

A wrong path is easy to give (`--config model.safetensors`, a lock path
that is a FIFO or /dev/zero), so nothing is read before the path is known
to be a regular file no bigger than such a file can be, and then never more
than that: a FIFO would block a reader for ever, a device or a checkpoint
would be read into memory whole.  Every problem is one ConfigError (exit
code 2) naming the file.  Pure but for reading the file; no trio.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Collection

from lazyfs.errors import ConfigError
from lazyfs.wording import quoted

# A model.json names two folders; the rest of it is the model's, small
# metadata.  16 MiB is thousands of times what one holds, and a small
# fraction of any checkpoint file given by mistake.
MODEL_JSON_MAX = 16 << 20
# A lock of 100,000 files is 32 MiB (90-character keys, one checksum each)
# to 52 MiB (multipart files of 16 parts: their part sizes are listed); a
# lock of 100,000 files of 1 GiB in 8 MiB parts, 150 MiB.  256 MiB holds
# all of those; a lock any bigger would also take gigabytes to parse.
LOCK_MAX = 256 << 20

_READ_CHUNK = 1 << 20
_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


class BadJson(ValueError):
    """JSON that json.loads takes but lazyfs does not: what is wrong, as a phrase."""


def read_text(path: Path, where: str, noun: str, limit: int, error: type[ConfigError] = ConfigError) -> str:
    """The UTF-8 text of the regular file `path`, of at most `limit` bytes.
    Problems raise `error` as "<where>: <what is wrong with the <noun>>"."""
    try:
        _check_regular(os.stat(path), where, noun, limit, error)
        # O_NONBLOCK: should the path become a FIFO after the stat, opening it
        # does not wait for a writer (and fstat below refuses it).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            _check_regular(os.fstat(fd), where, noun, limit, error)
            data = _read_at_most(fd, limit)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise error(f"{where}: {noun} not found") from None
    except PermissionError:
        raise error(f"{where}: permission denied reading the {noun}") from None
    except OSError as e:
        raise error(f"{where}: cannot read the {noun} ({e.strerror})") from None
    if len(data) > limit:  # grew since the stat, or a file whose size says nothing (/proc)
        raise error(f"{where}: more than {_size(limit)}, too big for a {noun}; is it the right file?")
    try:
        # utf-8-sig: a UTF-8 byte order mark, which Windows editors write at the
        # start of a file (Notepad, PowerShell 5's Out-File), is not part of the text.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{where}: not valid UTF-8 text (not a {noun}?)") from None


def _check_regular(st: os.stat_result, where: str, noun: str, limit: int, error: type[ConfigError]) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_TYPES if test(st.st_mode)), "a special file")
        raise error(f"{where}: is {kind}, not a {noun}")
    if st.st_size > limit:
        raise error(f"{where}: {st.st_size:,} bytes, too big for a {noun} (at most {_size(limit)}); "
                    "is it the right file?")


def _read_at_most(fd: int, limit: int) -> bytearray:
    """Up to `limit` + 1 bytes of `fd`: one more than allowed tells a file too big."""
    data = bytearray()
    while len(data) <= limit:
        chunk = os.read(fd, min(_READ_CHUNK, limit + 1 - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def parse_json(text: str, once: Collection[str] | None = None) -> Any:
    """json.loads, but a name repeated in one object is refused (BadJson),
    not silently the last one: whoever reads the file may see the first.
    `once`: the names that must not repeat (None: every name).  JSON nested
    deeper than Python can recurse, or a number of thousands of digits, is
    BadJson too (not a RecursionError, or a ValueError of int()).
    A text that is not JSON raises json.JSONDecodeError, as json.loads does."""

    def members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            seen: set[str] = set()
            for name, _ in pairs:
                if name in seen and (once is None or name in once):
                    raise BadJson(f"{quoted(name)} is given twice in one object")
                seen.add(name)
        return obj

    try:
        return json.loads(text, object_pairs_hook=members)
    except (json.JSONDecodeError, BadJson):
        raise
    except RecursionError:
        raise BadJson("arrays or objects nested too deeply to be read") from None
    except ValueError:  # the only other: an integer longer than int() takes (sys.get_int_max_str_digits)
        raise BadJson("a number too long to be read") from None
