"""Unit tests: model.json, prefixes, buckets and sizes parsed once, at the edge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lazyfs import options
from lazyfs.config import ConfigError, Source, bake_config, mount_config, parse_size, remote_config
from lazyfs.modeljson import dedupe_sources, load_model_json, normalize_prefix, parse_source, resolve_mountpoint
from lazyfs.remote import addressing


def mj(tmp_path: Path, content: object, raw: bool = False) -> Path:
    p = tmp_path / "model.json"
    p.write_text(content if raw else json.dumps(content))  # type: ignore[arg-type]
    return p


def test_model_json_minimal_and_full(tmp_path: Path) -> None:
    m = load_model_json(mj(tmp_path, {"download_files_from": "download/files/from"}))
    assert m.download_files_from == "download/files/from" and m.download_files_to is None
    m = load_model_json(mj(tmp_path, {"download_files_from": "a", "download_files_to": "/x",
                                      "_comment": "kept out of our way", "model": {"k": 1}}))
    assert m.download_files_to == "/x"


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object, found an array"),
    ('"text"', "must be a JSON object, found a string"),
    ("{}", 'missing "download_files_from"'),
    ('{"download_files_from": 3}', '"download_files_from" must be a string, found a number'),
    ('{"download_files_from": ["a"]}', "found an array"),
    ('{"download_files_from": ""}', '"download_files_from" is empty'),
    ('{"download_files_from": "a", "download_files_to": false}', '"download_files_to" must be a string'),
    ('{"download_file_from": "a"}', 'unknown key "download_file_from" (did you mean "download_files_from"?)'),
    ('{"download_files_from": "a", "download_files_too": "/x"}', 'did you mean "download_files_to"'),
])
def test_model_json_errors(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_model_json(mj(tmp_path, content, raw=True))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_model_json_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_model_json(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="is a directory"):
        load_model_json(tmp_path)


def test_sources() -> None:
    assert parse_source("s3://bkt/a/b", None, "x") == Source("bkt", "a/b/")
    assert parse_source("S3://bkt//a/b//", None, "x") == Source("bkt", "a/b/")
    assert parse_source("/a/b/", "dflt", "x") == Source("dflt", "a/b/")
    for bad, msg in [("s3://", "names no bucket"), ("s3:///a", "names no bucket"),
                     ("a/b", "no bucket"), ("s3://bkt", "folder is empty"), ("s3://bkt/", "folder is empty"),
                     ("http://x/y", "not an s3:// URI"), ("s3://b!d/x", "not a valid bucket name"),
                     ("s3://bkt/a/../b", "'..'"), ("s3://bkt/.lazyfs/x", "reserved"),
                     ("s3://bkt/a//b/./c", "empty path component"), ("s3://bkt/a/./c", "'.' path component")]:
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.").replace("(", r"\(")):
            parse_source(bad, None, "x")


@pytest.mark.parametrize("bucket", ["ab", "b" * 256, "a b", "b!d", "new\nline", "abc\n", "é-bucket", "a:b"])
def test_a_bucket_name_s3_cannot_have_is_bad_input(bucket: str) -> None:
    """One check, wherever the name comes from (model.json, --prefix, --bucket; the lock's: test_lockfile):
    a name no bucket can have is a configuration error (exit 2), not a bucket that "does not exist" (exit 1)."""
    for text, default in ((f"s3://{bucket}/m", None), ("m", bucket)):
        with pytest.raises(ConfigError, match="is not a valid bucket name") as info:
            parse_source(text, default, "model.json")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("bucket", ["abc", "models", "my-bucket.v2", "b" * 63, "1-2-3", "a.b.c",
                                    "my-ap-abc123-s3alias", "bucket--usw2-az1--x-s3",
                                    # us-east-1 before 2018, and S3-compatible stores' relaxed names
                                    "Legacy_Bucket", "UPPER", "b" * 255, "-abc", "a..b"])
def test_bucket_names_a_store_may_have_are_taken(bucket: str) -> None:
    assert parse_source(f"s3://{bucket}/m", None, "x") == Source(bucket, "m/")


def test_a_model_json_naming_download_files_from_twice_is_refused(tmp_path: Path) -> None:
    """Whoever reviews the file may read the first; json.loads alone would take the last."""
    p = mj(tmp_path, '{"download_files_from": "s3://approved/m", "download_files_from": "s3://other/m"}', raw=True)
    with pytest.raises(ConfigError) as info:
        load_model_json(p)
    assert str(info.value) == f'{p}: "download_files_from" is given twice in one object'
    p = mj(tmp_path, '{"download_files_from": "a", "model": {"k": 1}, "notes": "x", "notes": "y"}', raw=True)
    assert load_model_json(p).download_files_from == "a", "the model's own keys stay out of our way"


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000,
                                     '{"download_files_from": "a", "x": ' + "[" * 50_000 + "]" * 50_000 + "}"])
def test_a_model_json_nested_too_deeply_is_a_config_error(tmp_path: Path, content: str) -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_model_json(mj(tmp_path, content, raw=True))


def test_a_model_json_too_big_or_not_a_file_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "model.safetensors"
    with open(big, "wb") as f:
        f.truncate((16 << 20) + 1)
    with pytest.raises(ConfigError, match=r"too big for a config file \(at most 16 MiB\)"):
        load_model_json(big)
    with pytest.raises(ConfigError, match="is a character device, not a config file"):
        load_model_json("/dev/null")


def test_normalize_prefix() -> None:
    assert normalize_prefix("download/files/from", "x") == "download/files/from/"
    with pytest.raises(ConfigError):
        normalize_prefix("a/" + "n" * 300, "x")


def test_dedupe_sources_drops_nested_and_repeats() -> None:
    got = dedupe_sources([Source("b", "a/"), Source("b", "a/c/"), Source("b", "a/"),
                          Source("b", "ab/"), Source("o", "a/c/")])
    assert got == (Source("b", "a/"), Source("b", "ab/"), Source("o", "a/c/"))


def test_sizes() -> None:
    assert parse_size("8MiB", "x") == 8 << 20
    assert parse_size("512k", "x") == 512 << 10
    assert parse_size("1.5G", "x") == 3 << 29
    assert parse_size("4096", "x") == 4096
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("lots", "x")


def test_mountpoint_resolution(tmp_path: Path) -> None:
    a = load_model_json(mj(tmp_path, {"download_files_from": "a", "download_files_to": "/srv/x"}))
    assert str(resolve_mountpoint(None, [a])) == "/srv/x"
    assert str(resolve_mountpoint(None, [])) == "/var/practicus/cache"
    assert str(resolve_mountpoint("/m", [a])) == "/m"
    other = tmp_path / "b.json"
    other.write_text(json.dumps({"download_files_from": "b", "download_files_to": "/srv/y"}))
    with pytest.raises(ConfigError, match="different download_files_to"):
        resolve_mountpoint(None, [a, load_model_json(other)])


def _remote(endpoint: str | None, style: str | None, env: dict[str, str]):
    return remote_config({"endpoint_url": endpoint, "addressing_style": style}, env)


def test_remote_config_endpoint_precedence_and_path_style() -> None:
    assert _remote(None, None, {}).endpoint_url is None
    assert _remote(None, None, {}).addressing_style is None  # not given: remote.addressing decides
    env = {"AWS_ENDPOINT_URL": "http://generic:1", "AWS_ENDPOINT_URL_S3": "http://s3only:2"}
    cfg = _remote(None, None, env)
    assert cfg.endpoint_url == "http://s3only:2" and addressing(cfg.addressing_style, None, cfg.endpoint_url) == "path"
    assert _remote("https://flag:3", None, env).endpoint_url == "https://flag:3"
    assert _remote("https://flag:3", "virtual", env).addressing_style == "virtual"
    with pytest.raises(ConfigError, match="not an http"):
        _remote("ftp://x", None, {})
    # A URL's scheme is case-insensitive (RFC 3986): HTTP:// was refused as "not an http:// URL".
    assert _remote("HTTP://user:pw@Host:9000/gw", None, {}).endpoint_url == "http://user:pw@Host:9000/gw"
    assert _remote(None, None, {"AWS_ENDPOINT_URL": "Https://h"}).endpoint_url == "https://h"


def test_addressing_is_the_flags_else_the_profiles_else_path_with_any_endpoint() -> None:
    """An endpoint from the profile (not the flag or the environment) left
    botocore "auto", over the profile's own addressing_style: the CRT then
    addressed a bucket at `bucket.localhost`."""
    assert addressing(None, None, None) == "auto"
    assert addressing(None, None, "http://localhost:9000") == "path"
    assert addressing(None, {"addressing_style": "virtual"}, "http://localhost:9000") == "virtual"
    assert addressing(None, {"addressing_style": "path"}, None) == "path"
    assert addressing("virtual", {"addressing_style": "path"}, "http://localhost:9000") == "virtual"
    assert addressing("auto", None, "http://localhost:9000") == "auto"


def test_etags_count_as_md5s_unless_told_otherwise(tmp_path: Path) -> None:
    assert _remote(None, None, {}).etag_is_md5
    assert not remote_config({"no_etag_check": True}, {}).etag_is_md5
    assert not _mc(tmp_path, no_etag_check=True).remote.etag_is_md5


def _mc(tmp_path: Path, env: dict[str, str] | None = None, **kw: object):
    """mount_config from flag values as the command line gives them (strings)."""
    raw: dict[str, object] = {"mountpoint": str(tmp_path), "prefix": ["s3://bkt/p"]}
    raw.update(kw)
    return mount_config(options.parse_options(options.MOUNT, raw), env or {})


def test_mount_config_checks(tmp_path: Path) -> None:
    cfg = _mc(tmp_path)
    assert cfg.store is None and cfg.store_path == tmp_path
    assert _mc(tmp_path, prefix=["p"], env={"LAZYFS_BUCKET": "envb"}).sources == (Source("envb", "p/"),)
    with pytest.raises(ConfigError, match="does not exist"):
        _mc(tmp_path, mountpoint=str(tmp_path / "missing"))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        _mc(tmp_path, mountpoint=str(f))
    with pytest.raises(ConfigError, match=r"prebaked layer .* does not exist"):
        _mc(tmp_path, prebaked=[str(tmp_path / "nolayer")])
    with pytest.raises(ConfigError, match="nothing to serve"):
        _mc(tmp_path, prefix=[])
    with pytest.raises(ConfigError, match="too small"):
        _mc(tmp_path, part_size="1k")
    assert _mc(tmp_path, part_size="1MiB").fetch.part_size == 1 << 20


def _bc(tmp_path: Path, **kw: object):
    raw: dict[str, object] = {"to": str(tmp_path), "prefix": ["s3://bkt/p"]}
    raw.update(kw)
    return bake_config(options.parse_options(options.BAKE, raw), {})


@pytest.mark.parametrize("memory_limit, largest", [(None, "128MiB"), ("32MiB", "128MiB"), ("512MiB", "128MiB"),
                                                   ("4G", "1GiB"), ("20G", "5GiB")])
def test_a_crt_part_size_its_client_takes_is_accepted(tmp_path: Path, memory_limit: str | None,
                                                      largest: str) -> None:
    """awscrt takes parts of at most half its buffers, which are half of
    --memory-limit and at least 256 MiB."""
    cfg = _mc(tmp_path, transfer_client="crt", part_size=largest, memory_limit=memory_limit)
    assert cfg.fetch.part_size == parse_size(largest, "")


@pytest.mark.parametrize("part_size, memory_limit, message", [
    ("200MiB", None, "--part-size 200MiB is more than --transfer-client crt takes with --memory-limit 256MiB: "
     "at most 128MiB (a quarter of --memory-limit, never under 128MiB); lower --part-size or raise "
     "--memory-limit to 800MiB"),
    ("129MiB", "32MiB", "at most 128MiB"),
    ("1025MiB", "4G", "--part-size 1025MiB is more than --transfer-client crt takes with --memory-limit 4GiB: "
     "at most 1GiB"),
])
def test_a_crt_part_size_its_client_would_refuse_is_a_usage_error(tmp_path: Path, part_size: str,
                                                                  memory_limit: str | None, message: str) -> None:
    """It was "internal error: RuntimeError: 14371 (AWS_ERROR_S3_PART_SIZE_EXCEEDS_MEMORY_LIMIT)", exit 1."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        _mc(tmp_path, transfer_client="crt", part_size=part_size, memory_limit=memory_limit)
    assert _mc(tmp_path, part_size=part_size, memory_limit=memory_limit).fetch.part_size > 128 << 20, "boto3 takes it"


def test_bake_with_crt_takes_the_parts_its_memory_limit_allows(tmp_path: Path) -> None:
    """bake has --memory-limit, with the mount's meaning and checks (it had
    none, and its CRT parts were at most 128 MiB)."""
    assert _bc(tmp_path, transfer_client="crt", part_size="128MiB").fetch.part_size == 128 << 20
    with pytest.raises(ConfigError, match=re.escape(
            "--part-size 256MiB is more than --transfer-client crt takes with --memory-limit 256MiB: at most 128MiB "
            "(a quarter of --memory-limit, never under 128MiB); lower --part-size or raise --memory-limit to 1GiB")):
        _bc(tmp_path, transfer_client="crt", part_size="256M")
    cfg = _bc(tmp_path, transfer_client="crt", part_size="256M", memory_limit="2G")
    assert cfg.fetch.part_size == 256 << 20 and cfg.memory_limit == 2 << 30
    assert _bc(tmp_path, part_size="5G").fetch.part_size == 5 << 30
    with pytest.raises(ConfigError, match=re.escape("--memory-limit 16M is too small (at least 32MiB)")):
        _bc(tmp_path, memory_limit="16M")
    with pytest.raises(ConfigError, match=re.escape("--memory-limit 2P is too large (at most 1PiB")):
        _bc(tmp_path, memory_limit="2P")


@pytest.mark.parametrize("memory_limit, gets", [(None, 16), ("32MiB", 8), ("40MiB", 10), ("1G", 16)])
def test_bake_runs_as_many_parallel_gets_as_its_memory_limit_allows(tmp_path: Path, memory_limit: str | None,
                                                                   gets: int) -> None:
    """As a mount: half of --memory-limit for GETs in flight, 2 MiB each."""
    from lazyfs.bake import _within_memory

    assert _within_memory(_bc(tmp_path, memory_limit=memory_limit)).max_connections == gets


def test_the_crt_client_is_built_with_the_buffers_the_check_assumed() -> None:
    """crt.py and the flag check share one rule (crtlimits): the largest part
    the check lets through is one awscrt's client really takes."""
    s3 = pytest.importorskip("awscrt.s3")
    from awscrt import io

    from lazyfs.crtlimits import buffer_memory, largest_part

    loops = io.EventLoopGroup(1)
    bootstrap = io.ClientBootstrap(loops, io.DefaultHostResolver(loops))
    for memory_limit in (32 << 20, 256 << 20, 1 << 30):
        s3.S3Client(bootstrap=bootstrap, region="us-east-1", part_size=largest_part(memory_limit),
                    memory_limit=buffer_memory(memory_limit), tls_mode=s3.S3RequestTlsMode.DISABLED)
        with pytest.raises(RuntimeError, match="PART_SIZE_EXCEEDS_MEMORY_LIMIT"):
            s3.S3Client(bootstrap=bootstrap, region="us-east-1", part_size=largest_part(memory_limit) + 1,
                        memory_limit=buffer_memory(memory_limit), tls_mode=s3.S3RequestTlsMode.DISABLED)


def test_an_unparsable_last_modified_is_the_epoch_not_an_exception() -> None:
    from lazyfs.listxml import mtime_ns as _mtime_ns

    assert _mtime_ns("2026-12-01T21:33:43.000Z") == 1796160823 * 10**9
    assert _mtime_ns("Tue, 01 Dec 2026 21:33:43 GMT") == 1796160823 * 10**9
    for odd in ("2026-1x-01T00:00:00Z", "yesterday", "", None, 12):
        assert _mtime_ns(odd) == 0
