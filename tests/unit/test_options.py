"""Flags are spelled once (lazyfs/options.py): the parser, the checks, the
defaults shown in --help and the README's tables all follow that table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lazyfs import options
from lazyfs.cli import COMMANDS, build_parser, main
from lazyfs.config import ConfigError, FetchConfig, MountConfig, default_of

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def help_of(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_is_documented_in_the_readme(command: str) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    flags = [f for a in sub.choices[command]._actions for f in a.option_strings  # type: ignore[attr-defined]
             if f.startswith("--") and f not in ("--help", "--version")]
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){f}(?![\w-])", README)]
    assert flags and missing == []
    assert [o.flag for o in COMMANDS[command][0] if o.flag.startswith("--")] == flags, "one table per command"


def test_help_shows_the_defaults_of_the_config_classes() -> None:
    text = re.sub(r"\s+", " ", help_of("mount"))
    assert f"(default {default_of(FetchConfig, 'max_connections')})" in text
    assert "(default 8MiB)" in text and "(default 256MiB)" in text and "(default 1MiB)" in text
    assert f"(default {default_of(MountConfig, 'refresh'):g})" in text
    assert "(default 4)" in text  # --retries: 5 attempts


@pytest.mark.parametrize("flag, value, message", [
    ("part_size", "1k", "--part-size 1k is too small (at least 64KiB)"),
    ("max_connections", 0, "--max-connections 0 must be between 1 and 256"),
    ("retries", 21, "--retries 21 must be between 0 and 20"),
    # 0 is not "between 0 and 3600" to a reader: the bound itself is refused, so say so.
    ("read_timeout", 0.0, "--read-timeout 0 must be more than 0 and at most 3600 seconds"),
    ("read_deadline", 0.0, "--read-deadline 0 must be more than 0 and at most 86400 seconds"),
    ("read_deadline", 86401.0, "--read-deadline 86401 must be more than 0 and at most 86400 seconds"),
    ("refresh", -1.0, "--refresh -1 must be 0 (never) or a number of seconds"),
    ("refresh", -0.5, "--refresh -0.5 must be 0 (never) or a number of seconds"),
    ("memory_limit", "16MiB", "--memory-limit 16MiB is too small (at least 32MiB)"),
    ("metrics_port", 70000, "--metrics-port 70000 must be between 1 and 65535"),
    # Not an address: a usage error before the mount starts (was exit 1, "Name or service not known").
    ("metrics_addr", "999.1.1.1", "--metrics-addr '999.1.1.1' is neither an IP address nor a host name"),
    ("metrics_addr", "a b", "--metrics-addr 'a b' is neither an IP address nor a host name"),
    ("cache_max_size", "lots", "is not a size"),
    ("part_size", "6G", "--part-size 6G is too large (at most 5GiB: S3's largest part)"),
    ("part_size", "99999999999999999999999", "--part-size 99999999999999999999999 is too large (at most 5GiB"),
    ("part_size", "9" * 400, "is too large a size"),  # a float made it infinity: an internal error
    ("read_ahead", "1G", "--read-ahead 1G must be 0 (the kernel's 128KiB) or a multiple of 4KiB up to 16MiB"),
    ("read_ahead", "3000", "--read-ahead 3000 must be 0 (the kernel's 128KiB) or a multiple of 4KiB up to 16MiB"),
    ("read_ahead", "16388K", "--read-ahead 16388K must be 0"),
    # 0 kept nothing: every open downloaded its file again; 1 (a byte: 1 GiB meant) kept nothing either.
    ("cache_max_size", "0", "--cache-max-size 0 would keep next to nothing: the budget must be at least 1MiB, one "
     "download block (leave the flag out for no budget)"),
    ("cache_max_size", "0.0001K", "--cache-max-size 0.0001K would keep next to nothing"),
    ("cache_max_size", "0GiB", "--cache-max-size 0GiB would keep next to nothing"),
    ("cache_max_size", "1", "--cache-max-size 1 would keep next to nothing: the budget must be at least 1MiB"),
    ("cache_max_size", "1048575", "--cache-max-size 1048575 would keep next to nothing"),
    ("cache_max_size", "0.99M", "--cache-max-size 0.99M would keep next to nothing"),
    # More memory than any machine has (past 32 EiB the CRT's buffer count wrapped: an internal error).
    ("memory_limit", "1025P", "--memory-limit 1025P is too large (at most 1PiB: more memory than any machine has)"),
    ("memory_limit", "36893488147687538688", "--memory-limit 36893488147687538688 is too large (at most 1PiB"),
    # The mount is read-only: a write bit would be a lie, setuid a risk.
    ("file_mode", "0644", "--file-mode 0644 has bits a read-only file cannot have: use read (4) and execute (1)"),
    ("file_mode", "1555", "--file-mode 1555 has bits a read-only file cannot have"),
    ("file_mode", "rwx", "--file-mode rwx is not an octal mode such as 0444 or 0555"),
    ("file_mode", "0088", "--file-mode 0088 is not an octal mode"),
    ("file_mode", "0044", "--file-mode 0044 would keep the files' owner from reading them (give 0400)"),
    ("file_mode", "5", "--file-mode 5 would keep the files' owner from reading them"),  # was "not an octal mode"
    ("memory_limit", "9" * 100, "is too large a size"),  # was "is not a size"
    ("memory_limit", "1E", "--memory-limit 1E is too large (at most 1PiB"),
])
def test_bad_values_are_one_sentence_naming_the_flag(flag: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        options.parse_options(options.MOUNT, {flag: value})


@pytest.mark.parametrize("flag, value, expected", [
    ("part_size", "5GiB", 5 << 30), ("part_size", "64KiB", 64 << 10),
    ("read_ahead", "0", 0), ("read_ahead", "4K", 4096), ("read_ahead", "16MiB", 16 << 20),
    ("file_mode", "0555", 0o555), ("file_mode", "444", 0o444), ("file_mode", "0o0500", 0o500),
    ("file_mode", "00555", 0o555),  # as chmod takes it
    ("cache_max_size", "100E", 100 << 60),  # exbibytes are a size (was "not a size")
    ("cache_max_size", "1MiB", 1 << 20), ("cache_max_size", "1048576", 1 << 20),  # one download block
    ("metrics_addr", "0.0.0.0", "0.0.0.0"), ("metrics_addr", "::", "::"), ("metrics_addr", "localhost", "localhost"),
    ("metrics_addr", "metrics.svc.cluster.local", "metrics.svc.cluster.local"),
])
def test_the_bounds_themselves_are_accepted(flag: str, value: str, expected: int) -> None:
    assert options.parse_options(options.MOUNT, {flag: value})[flag] == expected


_SIZE_FLAGS = ("part_size", "memory_limit", "cache_max_size", "read_ahead")


@pytest.mark.parametrize("flag, value", [
    *((flag, "9" * 5000) for flag in _SIZE_FLAGS),  # not a size: more than 40 digits
    *((flag, "0" * 39 + "1x" + "0" * 5000) for flag in _SIZE_FLAGS),
    ("part_size", "9" * 40 + "P"), ("memory_limit", "9" * 40 + "P"),  # too large
    ("cache_max_size", " " * 5000 + "0"),  # would keep nothing
    ("read_ahead", "4097" + " " * 5000),  # not in pages
], ids=lambda v: v if len(v) < 50 else f"{v[:8]!r}...({len(v)} chars)")
def test_a_size_error_echoes_at_most_40_characters_of_the_value(flag: str, value: str) -> None:
    """A 5,000-digit value (a paste gone wrong) was echoed whole in its error line."""
    with pytest.raises(ConfigError) as e:
        options.parse_options(options.MOUNT, {flag: value})
    said = str(e.value)
    assert value[:40] + "..." in said and len(said) < 200, said


@pytest.mark.parametrize("value, expected", [("1M", 1 << 20), ("1P", 1 << 50), ("1024T", 1 << 50)])
def test_a_cache_budget_from_1mib_and_a_memory_limit_up_to_1pib_are_taken(value: str, expected: int) -> None:
    """1 PiB works with both transfer clients (a mount reads through them)."""
    assert options.parse_options(options.MOUNT, {"cache_max_size": value})["cache_max_size"] == expected
    if expected >= 32 << 20:
        assert options.parse_options(options.MOUNT, {"memory_limit": value})["memory_limit"] == expected


@pytest.mark.parametrize("value", ["0", "1", "1023K"])
def test_a_cache_budget_under_one_block_is_a_usage_error_of_one_line(value: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(["mount", str(tmp_path), "--prefix", "s3://bkt/p", "--cache-max-size", value])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert code == 2 and err == (f"lazyfs: error: --cache-max-size {value} would keep next to nothing: the budget "
                                 "must be at least 1MiB, one download block (leave the flag out for no budget)\n")


def test_the_smallest_cache_budget_is_one_download_block() -> None:
    assert FetchConfig(part_size=5 << 30).block_size == options.CACHE_MIN


def test_values_not_given_stay_unset_so_the_config_defaults_apply() -> None:
    got = options.parse_options(options.MOUNT, {"part_size": "16MiB", "retries": 0})
    assert got["part_size"] == 16 << 20 and got["retries"] == 0 and got["max_connections"] is None


def test_every_store_mode_has_its_permissions() -> None:
    from typing import get_args

    from lazyfs.config import StoreMode
    from lazyfs.layer import STORE_MODES

    assert set(STORE_MODES) == set(get_args(StoreMode))
