"""model.json and S3 folders: read and checked once, at the edge.

Each problem raises ConfigError with one sentence that names it (exit code 2
in the CLI).  No I/O beyond reading the files named, and a look at the folders named.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from lazyfs.errors import ConfigError, UnsafeKey
from lazyfs.mounttab import check_answering, is_fuse_mount
from lazyfs.namespace import key_parts
from lazyfs.userfile import MODEL_JSON_MAX, BadJson, parse_json, read_text
from lazyfs.wording import one_line, quoted

DEFAULT_CACHE_DIR = "/var/practicus/cache"
MODEL_JSON_KEYS = ("download_files_from", "download_files_to")

# S3's bucket naming rules: 3 to 63 lowercase letters, digits, dots and
# hyphens, starting and ending with a letter or digit, no two dots in a row,
# not an IP address.  A name that breaks them names no bucket (S3 and MinIO
# refuse to create one), so it is bad input (exit 2), not a missing bucket.
# Uppercase and underscores were allowed in us-east-1 before March 2018: such
# a bucket cannot be served.
# What any bucket name is made of: S3's rules since 2018 are stricter (3-63
# lowercase letters, digits, dots, hyphens), but buckets made before them in
# us-east-1, and S3-compatible stores (Ceph RGW's relaxed names), may have
# uppercase letters, underscores and up to 255 characters; the store refuses
# a name it does not have.
_BUCKET_RE = re.compile(r"[A-Za-z0-9._-]{3,255}")


@dataclass(frozen=True, slots=True)
class Source:
    """One S3 folder presented by the mount: `bucket` and `prefix` ("a/b/")."""

    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class ModelJson:
    """The parts of a model.json lazyfs uses."""

    path: Path
    download_files_from: str
    download_files_to: str | None


def load_model_json(path: str | os.PathLike[str]) -> ModelJson:
    """Read and check one model.json (other keys belong to the model and are kept
    out of our way, except near-misses of ours, which are almost always typos)."""
    p = Path(path)
    check_answering(p, "config file")
    text = read_text(p, str(p), "config file", MODEL_JSON_MAX)
    try:
        data = parse_json(text, once=MODEL_JSON_KEYS)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except BadJson as e:
        raise ConfigError(f"{p}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: must be a JSON object, found {_json_type(data)}")
    _reject_near_misses(p, data)
    if "download_files_from" not in data:
        raise ConfigError(f"{p}: missing \"download_files_from\" (the S3 folder to serve)")
    src = data["download_files_from"]
    if not isinstance(src, str):
        raise ConfigError(f"{p}: \"download_files_from\" must be a string, found {_json_type(src)}")
    if not src.strip():
        raise ConfigError(f"{p}: \"download_files_from\" is empty")
    dst = data.get("download_files_to")
    if dst is not None and not isinstance(dst, str):
        raise ConfigError(f"{p}: \"download_files_to\" must be a string, found {_json_type(dst)}")
    if dst is not None and not dst.strip():
        raise ConfigError(f"{p}: \"download_files_to\" is empty")
    return ModelJson(path=p, download_files_from=src, download_files_to=dst)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _reject_near_misses(path: Path, data: Mapping[str, Any]) -> None:
    for key in data:
        if key in MODEL_JSON_KEYS or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, MODEL_JSON_KEYS, n=1, cutoff=0.85)
        if close:
            raise ConfigError(f"{path}: unknown key {quoted(key)} (did you mean \"{close[0]}\"?)")


def parse_source(text: str, default_bucket: str | None, where: str) -> Source:
    """`s3://bucket/prefix` or a plain prefix in `default_bucket`."""
    text = text.strip()
    if text.lower().startswith("s3://"):
        rest = text[5:]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ConfigError(f"{where}: {quoted(text)} names no bucket (expected s3://BUCKET/FOLDER)")
        check_bucket(bucket, where)
    else:
        if "://" in text:
            raise ConfigError(f"{where}: {quoted(text)} is not an s3:// URI or a plain folder")
        bucket, prefix = default_bucket or "", text
        if not bucket:
            raise ConfigError(f"{where}: no bucket for {quoted(text)} "
                              f"(use s3://BUCKET/{one_line(text.lstrip('/'))}, --bucket, or LAZYFS_BUCKET)")
        check_bucket(bucket, "--bucket (or LAZYFS_BUCKET)")
    return Source(bucket=bucket, prefix=normalize_prefix(prefix, where))


def check_bucket(name: str, where: str) -> None:
    """Refuse a bucket name S3 cannot have (ConfigError), wherever it was given."""
    if not _BUCKET_RE.fullmatch(name):
        raise ConfigError(f"{where}: {quoted(name)} is not a valid bucket name (3 to 255 letters, digits, "
                          "dots, hyphens and underscores)")


def normalize_prefix(prefix: str, where: str) -> str:
    """"/a/b" -> "a/b/"; rejects what could not map to a safe path."""
    stripped = prefix.strip("/")
    if not stripped:
        raise ConfigError(f"{where}: the S3 folder is empty (name a folder such as models/my-model)")
    try:
        key_parts(stripped)
    except UnsafeKey as e:
        raise ConfigError(f"{where}: folder {quoted(prefix)} cannot be a path ({e})") from None
    return stripped + "/"


def dedupe_sources(sources: Sequence[Source]) -> tuple[Source, ...]:
    """Drop repeats and folders nested inside another configured folder of the
    same bucket (their objects are listed once, through the outer folder)."""
    unique = sorted(set(sources), key=lambda s: (s.bucket, s.prefix))
    kept: list[Source] = []
    for s in unique:
        if any(k.bucket == s.bucket and s.prefix.startswith(k.prefix) for k in kept):
            continue
        kept.append(s)
    return tuple(kept)


def resolve_mountpoint(positional: str | None, configs: Sequence[ModelJson]) -> Path:
    if positional:
        return Path(os.path.abspath(positional))
    targets = {os.path.abspath(c.download_files_to) for c in configs if c.download_files_to}
    if len(targets) > 1:
        raise ConfigError(
            "the config files name different download_files_to folders "
            f"({', '.join(sorted(targets))}); give the MOUNTPOINT explicitly")
    return Path(targets.pop() if targets else DEFAULT_CACHE_DIR)


def check_directory(path: Path, what: str, missing_ok: bool = False) -> None:
    """A folder the command will use: it must be one (or, with `missing_ok`,
    not exist yet), and not on a FUSE mount that never answers (MountError)."""
    check_answering(path, what)
    try:
        st = path.stat()
    except FileNotFoundError:
        if missing_ok:
            return
        raise ConfigError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{what} {path}: permission denied") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} is not a directory")


def check_target(path: Path, what: str) -> None:
    """A folder a command reads, or a FUSE mount there: a running one is
    asked (it must answer), a plain folder must be one (check_directory)."""
    (check_answering if is_fuse_mount(path) else check_directory)(path, what)


def output_file(path: str | None, flag: str) -> Path | None:
    """A file to write (a lock): its folder must exist."""
    if not path:
        return None
    out = Path(os.path.abspath(path))
    check_directory(out.parent, f"{flag} folder")
    if out.is_dir():
        raise ConfigError(f"{flag} {out} is a directory; name the lock file to write")
    return out


def build_sources(configs: Sequence[ModelJson], prefixes: Sequence[str],
                  bucket: str | None) -> tuple[Source, ...]:
    sources = [parse_source(c.download_files_from, bucket, str(c.path)) for c in configs]
    sources += [parse_source(p, bucket, "--prefix") for p in prefixes]
    if not sources:
        raise ConfigError("nothing to serve: give --config model.json or --prefix FOLDER")
    return dedupe_sources(sources)


