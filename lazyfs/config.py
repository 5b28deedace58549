"""Configuration: model.json, flags and environment, parsed and validated once.

Everything after this module works with the frozen types below; nothing else
reads raw strings from the user or `os.environ`.  Each problem raises
`ConfigError` with one sentence that names it (exit code 2 in the CLI).
"""

from __future__ import annotations

import difflib
import errno
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, cast

from lazyfs.errors import ConfigError, UnsafeKey
from lazyfs.namespace import key_parts

DEFAULT_CACHE_DIR = "/var/practicus/cache"
MODEL_JSON_KEYS = ("download_files_from", "download_files_to")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_READ_AHEAD = 1024 * 1024
DEFAULT_REFRESH_S = 60.0
DEFAULT_MEMORY_LIMIT = 256 * 1024 * 1024

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


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


AddressingStyle = Literal["auto", "path", "virtual"]


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """How to reach the object store.  Credentials are never held here: boto3's
    standard chain (environment, profiles, container and IRSA roles) finds them."""

    endpoint_url: str | None = None
    region: str | None = None
    # Path-style is what MinIO, Ceph and most S3-compatible stores need; AWS
    # itself prefers virtual-hosted.  "auto" lets botocore decide.
    addressing_style: AddressingStyle = "auto"
    # botocore's own retries (standard mode: exponential backoff with jitter,
    # covers 5xx, SlowDown, throttling and connection errors before the body).
    # 5 attempts ride out the usual brief S3 hiccups in about 5 seconds.
    max_attempts: int = 5
    connect_timeout: float = 5.0
    # A body that delivers no byte for this long is a stalled connection.
    read_timeout: float = 20.0
    # Sized to the download concurrency so that no request waits for a socket.
    max_pool_connections: int = 32


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """The download engine's shape."""

    # 8 MiB is S3's sweet spot for ranged GETs (what boto3 and Mountpoint use):
    # large enough to amortise the ~30 ms first-byte latency, small enough
    # that a reader waiting for one chunk is not held up for long.
    part_size: int = 8 * 1024 * 1024
    # Ranged GETs in flight across all downloads of one process.
    max_connections: int = 16
    # How many times one chunk is retried after the body broke off mid-way
    # (botocore retries only until the response headers arrive).
    chunk_attempts: int = 5
    # A read that waits longer than this for its bytes fails with EIO instead
    # of hanging the reader (the download itself keeps retrying).
    read_deadline: float = 60.0
    # --verify etag: check unrecorded local copies' content, not just size.
    verify_prebaked: bool = False

    @property
    def block_size(self) -> int:
        """The unit of download bookkeeping (and of resume): 1 MiB, so a reader
        jumping ahead fetches about what it needs, not a whole part."""
        return min(self.part_size, 1024 * 1024)


@dataclass(frozen=True, slots=True)
class MountConfig:
    mountpoint: Path
    sources: tuple[Source, ...]
    # None: the mountpoint's own underlying directory, opened before mounting.
    store: Path | None = None
    prebaked: tuple[Path, ...] = ()
    allow_other: bool = False
    log_level: str = "info"
    # Kernel readahead for the mount (see mount.set_read_ahead); 0 keeps the default.
    read_ahead: int = DEFAULT_READ_AHEAD
    # None: no warm-up; () every file; else glob patterns (see prefetch.matcher).
    prefetch: tuple[str, ...] | None = None
    # Seconds between listings: new versions of a model appear within this
    # long, at the cost of one LIST per 1000 objects each time.  0: never.
    refresh: float = DEFAULT_REFRESH_S
    # Bytes of fetched files kept in the store (None: no limit).
    cache_max_size: int | None = None
    # What the process may use beyond Python and boto3 themselves (about
    # 100 MiB): mapped pages of files being read and buffers of the ranged
    # GETs in flight (see mount.apply_memory_limit).
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    # user.lazyfs.* attributes (False: --no-xattrs, see fuse_ops).
    xattrs: bool = True
    # Prometheus /metrics (None: off).  Loopback unless widened on purpose.
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)

    @property
    def store_path(self) -> Path:
        return self.store if self.store is not None else self.mountpoint


@dataclass(frozen=True, slots=True)
class BakeConfig:
    sources: tuple[Source, ...]
    target: Path
    log_level: str = "info"
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)


@dataclass(frozen=True, slots=True)
class StatusConfig:
    sources: tuple[Source, ...]
    store: Path
    prebaked: tuple[Path, ...] = ()
    as_json: bool = False
    require_all: bool = False
    remote: RemoteConfig = field(default_factory=RemoteConfig)


@dataclass(frozen=True, slots=True)
class DoctorConfig:
    sources: tuple[Source, ...]
    mountpoint: Path
    store: Path
    allow_other: bool = False
    remote: RemoteConfig = field(default_factory=RemoteConfig)


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
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a model.json file") from None
    except PermissionError:
        raise ConfigError(f"{p}: permission denied reading the config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not valid UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
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
            raise ConfigError(f"{path}: unknown key \"{key}\" (did you mean \"{close[0]}\"?)")


def parse_source(text: str, default_bucket: str | None, where: str) -> Source:
    """`s3://bucket/prefix` or a plain prefix in `default_bucket`."""
    text = text.strip()
    if text.lower().startswith("s3://"):
        rest = text[5:]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ConfigError(f"{where}: \"{text}\" names no bucket (expected s3://BUCKET/FOLDER)")
    else:
        if "://" in text:
            raise ConfigError(f"{where}: \"{text}\" is not an s3:// URI or a plain folder")
        bucket, prefix = default_bucket or "", text
        if not bucket:
            raise ConfigError(
                f"{where}: no bucket for \"{text}\" (use s3://BUCKET/{text.lstrip('/')}, --bucket, or LAZYFS_BUCKET)")
    if not _BUCKET_RE.match(bucket):
        raise ConfigError(f"{where}: \"{bucket}\" is not a valid bucket name")
    return Source(bucket=bucket, prefix=normalize_prefix(prefix, where))


def normalize_prefix(prefix: str, where: str) -> str:
    """"/a/b" -> "a/b/"; rejects what could not map to a safe path."""
    stripped = prefix.strip("/")
    if not stripped:
        raise ConfigError(f"{where}: the S3 folder is empty (name a folder such as models/my-model)")
    try:
        key_parts(stripped)
    except UnsafeKey as e:
        raise ConfigError(f"{where}: folder \"{prefix}\" cannot be a path ({e})") from None
    return stripped + "/"


def parse_size(text: str, what: str) -> int:
    """"8MiB", "512k", "10G", "1048576" -> bytes (binary multiples)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"{what}: \"{text}\" is not a size (examples: 8MiB, 512K, 10G)")
    mult = 1024 ** " kmgtp".index((m.group(2) or " ").lower())
    return int(float(m.group(1)) * mult)


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


def remote_endpoint(flag: str | None, env: Mapping[str, str]) -> str | None:
    """The endpoint the user chose, by the precedence boto3 documents."""
    for value in (flag, env.get("AWS_ENDPOINT_URL_S3"), env.get("AWS_ENDPOINT_URL")):
        if value:
            if not re.match(r"^https?://[^/\s]+", value):
                raise ConfigError(f"endpoint \"{value}\" is not an http:// or https:// URL")
            return value
    return None


def resolve_mountpoint(positional: str | None, configs: Sequence[ModelJson]) -> Path:
    if positional:
        return Path(os.path.abspath(positional))
    targets = {os.path.abspath(c.download_files_to) for c in configs if c.download_files_to}
    if len(targets) > 1:
        raise ConfigError(
            "the config files name different download_files_to folders "
            f"({', '.join(sorted(targets))}); give the MOUNTPOINT explicitly")
    return Path(targets.pop() if targets else DEFAULT_CACHE_DIR)


def check_directory(path: Path, what: str) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{what} {path}: permission denied") from None
    except OSError as e:
        # ENOTCONN here means a lazyfs (or other FUSE daemon) died and left its
        # mount behind; mount.py explains and cleans that up, so let it through.
        if what == "mountpoint" and e.errno == errno.ENOTCONN:
            return
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} is not a directory")


def build_sources(configs: Sequence[ModelJson], prefixes: Sequence[str],
                  bucket: str | None) -> tuple[Source, ...]:
    sources = [parse_source(c.download_files_from, bucket, str(c.path)) for c in configs]
    sources += [parse_source(p, bucket, "--prefix") for p in prefixes]
    if not sources:
        raise ConfigError("nothing to serve: give --config model.json or --prefix FOLDER")
    return dedupe_sources(sources)


def mount_config(*, mountpoint: str | None, config_files: Sequence[str], prefixes: Sequence[str],
                 bucket: str | None, endpoint_url: str | None, store: str | None,
                 prebaked: Sequence[str], allow_other: bool, log_level: str,
                 addressing_style: str | None, part_size: str | None, max_connections: int | None,
                 env: Mapping[str, str], read_ahead: str | None = None,
                 prefetch: bool = False, prefetch_globs: Sequence[str] = (),
                 refresh: float | None = None, verify: str = "size",
                 cache_max_size: str | None = None, metrics_port: int | None = None,
                 metrics_addr: str = "127.0.0.1", retries: int | None = None,
                 read_timeout: float | None = None, read_deadline: float | None = None,
                 memory_limit: str | None = None, xattrs: bool = True) -> MountConfig:
    """The whole mount configuration from flags, model.json files and environment."""
    configs = [load_model_json(p) for p in config_files]
    sources = build_sources(configs, prefixes, bucket or env.get("LAZYFS_BUCKET") or None)
    mnt = resolve_mountpoint(mountpoint, configs)
    check_directory(mnt, "mountpoint")
    store_path = Path(os.path.abspath(store)) if store else None
    if store_path is not None and store_path.exists():
        check_directory(store_path, "store")
    layers = tuple(Path(os.path.abspath(p)) for p in prebaked)
    for layer in layers:
        check_directory(layer, "prebaked layer")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log level \"{log_level}\" is not one of {', '.join(LOG_LEVELS)}")
    ra = parse_size(read_ahead, "--read-ahead") if read_ahead is not None else DEFAULT_READ_AHEAD
    return MountConfig(mountpoint=mnt, sources=sources, store=store_path, prebaked=layers,
                       allow_other=allow_other, log_level=log_level, read_ahead=ra,
                       prefetch=prefetch_patterns(prefetch, prefetch_globs),
                       refresh=check_refresh(refresh),
                       cache_max_size=parse_size(cache_max_size, "--cache-max-size") if cache_max_size else None,
                       metrics_port=check_port(metrics_port), metrics_addr=metrics_addr,
                       memory_limit=check_memory(memory_limit), xattrs=xattrs,
                       remote=remote_config(endpoint_url, addressing_style, env, max_connections, retries,
                                            read_timeout),
                       fetch=fetch_config(part_size, max_connections, verify, retries, read_deadline))


def check_memory(value: str | None) -> int:
    if value is None:
        return DEFAULT_MEMORY_LIMIT
    limit = parse_size(value, "--memory-limit")
    if limit < 32 * 1024 * 1024:
        raise ConfigError(f"--memory-limit {value} is too small (at least 32MiB)")
    return limit


def check_port(port: int | None) -> int | None:
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--metrics-port {port} is not a TCP port (1-65535)")
    return port


def check_refresh(value: float | None) -> float:
    if value is None:
        return DEFAULT_REFRESH_S
    if value < 0 or math.isnan(value):
        raise ConfigError(f"--refresh {value} must be 0 (never) or a number of seconds")
    return float(value)


def prefetch_patterns(everything: bool, globs: Sequence[str]) -> tuple[str, ...] | None:
    """None: no warm-up; (): every file; else the glob patterns to warm up."""
    patterns = tuple(g.strip() for g in globs)
    if any(not p for p in patterns):
        raise ConfigError("--prefetch-glob pattern is empty")
    if patterns:
        return patterns
    return () if everything else None


def remote_config(endpoint_url: str | None, addressing_style: str | None, env: Mapping[str, str],
                  max_connections: int | None = None, retries: int | None = None,
                  read_timeout: float | None = None) -> RemoteConfig:
    endpoint = remote_endpoint(endpoint_url, env)
    style = addressing_style or ("path" if endpoint else "auto")
    if style not in ("auto", "path", "virtual"):
        raise ConfigError(f"addressing style \"{style}\" is not one of auto, path, virtual")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    # Ranged GETs, plus the listing's parallel requests (catalog: up to 32),
    # plus a few for HEADs: no request ever waits for, or throws away, a socket.
    pool = (max_connections or FetchConfig().max_connections) + 40
    dflt = RemoteConfig()
    attempts = check_retries(retries)
    timeout = dflt.read_timeout if read_timeout is None else read_timeout
    if not 0 < timeout <= 3600:
        raise ConfigError(f"--read-timeout {read_timeout} must be between 0 and 3600 seconds")
    return RemoteConfig(endpoint_url=endpoint, region=region, addressing_style=cast(AddressingStyle, style),
                        max_pool_connections=pool, max_attempts=attempts, read_timeout=timeout)


def check_retries(retries: int | None) -> int:
    """--retries N: attempts per request (botocore's, and ours for a body that
    broke off mid-way) -- N retries mean N + 1 attempts."""
    if retries is None:
        return RemoteConfig().max_attempts
    if not 0 <= retries <= 20:
        raise ConfigError(f"--retries {retries} must be between 0 and 20")
    return retries + 1


def fetch_config(part_size: str | None, max_connections: int | None, verify: str = "size",
                 retries: int | None = None, read_deadline: float | None = None) -> FetchConfig:
    cfg = FetchConfig()
    size = parse_size(part_size, "--part-size") if part_size else cfg.part_size
    if size < 64 * 1024:
        raise ConfigError(f"--part-size {part_size} is too small (at least 64KiB)")
    conns = max_connections if max_connections is not None else cfg.max_connections
    if not 1 <= conns <= 256:
        raise ConfigError(f"--max-connections {conns} must be between 1 and 256")
    if verify not in ("size", "etag"):
        raise ConfigError(f"--verify {verify} must be size or etag")
    deadline = cfg.read_deadline if read_deadline is None else read_deadline
    if not 0 < deadline <= 86400:
        raise ConfigError(f"--read-deadline {read_deadline} must be between 0 and 86400 seconds")
    return FetchConfig(part_size=size, max_connections=conns, chunk_attempts=check_retries(retries),
                       read_deadline=deadline, verify_prebaked=verify == "etag")


def bake_config(*, target: str | None, config_files: Sequence[str], prefixes: Sequence[str],
                bucket: str | None, endpoint_url: str | None, addressing_style: str | None,
                part_size: str | None, max_connections: int | None, log_level: str,
                env: Mapping[str, str], retries: int | None = None,
                read_timeout: float | None = None) -> BakeConfig:
    configs = [load_model_json(p) for p in config_files]
    sources = build_sources(configs, prefixes, bucket or env.get("LAZYFS_BUCKET") or None)
    to = resolve_mountpoint(target, configs)
    if to.exists():
        check_directory(to, "--to folder")
    return BakeConfig(sources=sources, target=to, log_level=log_level,
                      remote=remote_config(endpoint_url, addressing_style, env, max_connections, retries,
                                           read_timeout),
                      fetch=fetch_config(part_size, max_connections, retries=retries))


def status_config(*, store: str | None, config_files: Sequence[str], prefixes: Sequence[str],
                  bucket: str | None, endpoint_url: str | None, addressing_style: str | None,
                  prebaked: Sequence[str], as_json: bool, require_all: bool,
                  env: Mapping[str, str]) -> StatusConfig:
    configs = [load_model_json(p) for p in config_files]
    sources = build_sources(configs, prefixes, bucket or env.get("LAZYFS_BUCKET") or None)
    path = Path(os.path.abspath(store)) if store else resolve_mountpoint(None, configs)
    check_directory(path, "store")
    layers = tuple(Path(os.path.abspath(p)) for p in prebaked)
    for layer in layers:
        check_directory(layer, "prebaked layer")
    return StatusConfig(sources=sources, store=path, prebaked=layers,
                        as_json=as_json, require_all=require_all,
                        remote=remote_config(endpoint_url, addressing_style, env))


def doctor_config(*, mountpoint: str | None, config_files: Sequence[str], prefixes: Sequence[str],
                  bucket: str | None, endpoint_url: str | None, addressing_style: str | None,
                  store: str | None, allow_other: bool, env: Mapping[str, str]) -> DoctorConfig:
    configs = [load_model_json(p) for p in config_files]
    sources = build_sources(configs, prefixes, bucket or env.get("LAZYFS_BUCKET") or None)
    mnt = resolve_mountpoint(mountpoint, configs)
    return DoctorConfig(sources=sources, mountpoint=mnt,
                        store=Path(os.path.abspath(store)) if store else mnt, allow_other=allow_other,
                        remote=remote_config(endpoint_url, addressing_style, env))
