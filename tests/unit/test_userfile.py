"""Files a user names (a model.json, a lock) are read whole only when they are
regular files of a size such a file can have, never more than that, and
parsed as JSON strictly: a repeated name, or nesting deeper than Python
recurses, is one ConfigError, not a silent last value or a RecursionError."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from lazyfs.errors import ConfigError
from lazyfs.userfile import BadJson, parse_json, read_text


def read(path: Path, limit: int = 1000) -> str:
    return read_text(path, str(path), "config file", limit)


def test_a_regular_file_up_to_the_limit_is_read(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text("é" * 500)  # 1000 bytes of UTF-8
    assert read(tmp_path / "m.json") == "é" * 500


def test_a_file_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "model.safetensors"
    with open(big, "wb") as f:
        f.truncate(1001)
    with pytest.raises(ConfigError) as info:
        read(big)
    assert str(info.value) == (f"{big}: 1,001 bytes, too big for a config file (at most 1000 bytes); "
                               "is it the right file?")


def test_no_more_than_the_limit_is_read_from_a_file_whose_size_says_nothing() -> None:
    status = Path("/proc/self/status")  # a regular file of size 0, with hundreds of bytes in it
    assert status.stat().st_size == 0
    with pytest.raises(ConfigError, match=r"^/proc/self/status: more than 16 bytes, too big for a config file"):
        read(status, limit=16)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def refused() -> None:
        try:
            read(fifo)
        except ConfigError as e:
            outcome.append(e)

    reader = threading.Thread(target=refused)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # release the blocked open before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
        pytest.fail("reading a FIFO blocked")
    assert str(outcome[0]) == f"{fifo}: is a FIFO (named pipe), not a config file"


# Never /dev/zero here: should the check ever break, a test must not read memory full.
@pytest.mark.parametrize("path, message", [
    ("/dev/null", "/dev/null: is a character device, not a config file"),
    ("/", "/: is a directory, not a config file"),
])
def test_what_is_not_a_regular_file_is_refused_unread(path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        read(Path(path))
    assert str(info.value) == message


def test_missing_and_not_text(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        read(tmp_path / "nope.json")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not valid UTF-8 text"):
        read(tmp_path / "bin")


def test_a_repeated_name_is_refused_not_the_last_one_taken() -> None:
    with pytest.raises(BadJson) as info:
        parse_json('{"a": 1, "b": {"c": 1, "c": 2}}')
    assert str(info.value) == '"c" is given twice in one object'
    # only the names in `once`, when given
    assert parse_json('{"x": 1, "x": 2, "a": 3}', once=("a",)) == {"x": 2, "a": 3}
    with pytest.raises(BadJson, match='"a" is given twice'):
        parse_json('{"a": 1, "x": 2, "a": 3}', once=("a",))


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a": ' * 5000 + "1" + "}" * 5000])
def test_nesting_deeper_than_python_recurses_is_bad_json(text: str) -> None:
    with pytest.raises(BadJson, match="nested too deeply"):
        parse_json(text)


def test_a_number_of_thousands_of_digits_is_bad_json() -> None:
    with pytest.raises(BadJson, match="a number too long"):
        parse_json('{"lazyfs_lock": ' + "1" * 5000 + "}")


def test_what_is_not_json_is_a_decode_error_as_before() -> None:
    with pytest.raises(json.JSONDecodeError):
        parse_json("{nope")


BOM = b"\xef\xbb\xbf"  # what Windows editors (Notepad, PowerShell 5's Out-File -Encoding utf8) write first


def test_a_model_json_saved_with_a_utf8_bom_is_read(tmp_path: Path) -> None:
    from lazyfs.modeljson import load_model_json

    path = tmp_path / "model.json"
    path.write_bytes(BOM + json.dumps({"download_files_from": "s3://models/llm/v3",
                                       "download_files_to": "/var/practicus/cache"}).encode())
    model = load_model_json(path)
    assert model.download_files_from == "s3://models/llm/v3"
    assert model.download_files_to == "/var/practicus/cache"


def test_a_lock_saved_with_a_utf8_bom_is_read_and_its_digest_holds(tmp_path: Path) -> None:
    from lazyfs import lockfile
    from lazyfs.lockfile import ConfigRef, Entry, Folder
    from lazyfs.verify import Expectation

    etag = "a" * 32
    config = Entry("models", "llm/v3/config.json", 10, etag, "", 1_767_225_600 * 10**9, Expectation("MD5", etag))
    lock = lockfile.make([Folder("models", "llm/v3/", (config,))], [ConfigRef("model.json", "s3://models/llm/v3")],
                         "lazyfs test")
    path = tmp_path / "model.lock.json"
    path.write_bytes(BOM + lockfile.dumps(lock).encode())
    back = lockfile.read(path)
    assert back.digest == lock.digest and back.files == 1


def test_a_bom_is_dropped_only_at_the_start(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(BOM + b'{"a": "\xef\xbb\xbf"}')
    assert read_text(path, "f", "file", 100) == '{"a": "\ufeff"}'
