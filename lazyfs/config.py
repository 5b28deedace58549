"""Configuration: frozen types, built once from flags, model.json files and
the environment.

Every default lives here, on its field, with its reason; the flags that set
them (options.py) show them in `--help` from here.  Everything after this
module works with these types; nothing else reads raw strings from the user
or `os.environ`.  Each problem raises ConfigError with one sentence that names
it (exit code 2 in the CLI).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from lazyfs import memlimit, redact
from lazyfs.crtlimits import check_part_size
from lazyfs.errors import BadEndpoint, ConfigError
from lazyfs.lockfile import ConfigRef, Lock, check_sources, read
from lazyfs.modeljson import (
    DEFAULT_CACHE_DIR,
    ModelJson,
    Source,
    build_sources,
    check_directory,
    check_target,
    load_model_json,
    output_file,
    resolve_mountpoint,
)
from lazyfs.mounttab import check_answering, is_fuse_mount, is_lazyfs_mount
from lazyfs.sizes import parse_size

LOG_LEVELS = ("debug", "info", "warning", "error")
MiB = 1024 * 1024

AddressingStyle = Literal["auto", "path", "virtual"]
StoreMode = Literal["private", "group", "public"]

# --store-mode, for `mount` and `bake`: who may read the store beneath the mount.  "private"
# (0700 folders): only the daemon's user, so the mount alone decides who reads the files
# (--allow-other), whatever the store's parent allows.  "group" (0750) and "public" (0755):
# other users' processes read the store directly (a baked image mounted as another user).
# Not given (None): the mode the store has (storemodes.py), so what a command adds to a
# shared store stays reachable by its readers; a new store's is this one.
DEFAULT_STORE_MODE: StoreMode = "private"
# --file-mode (mount, bake): files' permission bits, as S3 keeps none; read-only unless asked (filemodes.py).
DEFAULT_FILE_MODE = 0o444


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """How to reach the object store.  Credentials are never held here: boto3's
    standard chain (environment, profiles, container and IRSA roles) finds them."""

    endpoint_url: str | None = field(default=None, repr=False)  # as given: its password shown by redact.url only
    region: str | None = None
    # --addressing-style; None: the profile's, else path with an endpoint from any source
    # (what MinIO, Ceph and most S3-compatible stores need), else "auto" (remote.addressing).
    addressing_style: AddressingStyle | None = None
    # botocore's own retries (standard mode, covering 5xx, SlowDown, throttling
    # and connection errors before the body), waiting as backoff.py says:
    # 5 attempts ride out the usual brief S3 hiccups, 3 to 9 s in all.
    max_attempts: int = 5
    connect_timeout: float = 5.0
    # A body that delivers no byte for this long is a stalled connection.
    read_timeout: float = 20.0
    # Sized to the download concurrency so that no request waits for a socket.
    max_pool_connections: int = 32
    # A 32-hex-digit ETag is the MD5 of the content, as on AWS for single-part
    # plaintext and SSE-S3 objects (--no-etag-check: not on this store).
    etag_is_md5: bool = True
    # botocore's chain asks the instance metadata service last (AWS_EC2_METADATA_DISABLED not "true"): a
    # mount that finds no credentials at all may be on an instance whose IMDS does not answer yet.
    instance_metadata: bool = True


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """The download engine's shape."""

    # 8 MiB is S3's sweet spot for ranged GETs (what boto3 and Mountpoint use):
    # large enough to amortise the ~30 ms first-byte latency, small enough
    # that a reader waiting for one part is not held up for long.
    part_size: int = 8 * MiB
    # Ranged GETs in flight across all downloads of one process.
    max_connections: int = 16
    # How many times one request is tried when its body breaks off mid-way
    # (botocore retries only until the response headers arrive).
    chunk_attempts: int = 5
    # A read waiting longer for its bytes fails with EIO instead of hanging the reader (the download retries on).
    read_deadline: float = 60.0
    # --verify etag: check unrecorded local copies' content, not just size.
    verify_prebaked: bool = False
    # Fetch safetensors files in the order loaders read tensors, start a
    # sharded checkpoint's next shard when one is read through, and a model
    # folder's small files when its config.json is opened (modelaware.py).
    model_readahead: bool = True
    # Which opens of a file still downloading wait for the whole file, so the
    # kernel then reads the local copy itself (passthrough.py) instead of
    # lazyfs answering every read: "checkpoint" (the shards of a checkpoint
    # a loader is walking: handles.Handles._opens_whole), "always" or "never".
    whole_file_open: str = "checkpoint"
    # Who sends the ranged GETs: boto3's Python threads (ranged_get.py) or awscrt's C client (crt.py).
    transfer_client: str = "boto3"
    # How downloaded bytes reach the store: "direct" (O_DIRECT: storewrite.py) or "buffered".
    store_writes: str = "direct"
    # A new path is linked to a stored file with its ETag and size (the content
    # index).  Off with --no-etag-check: ETags that are not digests need not
    # name the same bytes under two keys.
    link_same_etag: bool = True

    @property
    def block_size(self) -> int:
        """The unit of download state (and of resume): 1 MiB, so a reader
        jumping ahead fetches about what it needs, not a whole part."""
        return min(self.part_size, MiB)


@dataclass(frozen=True, slots=True)
class MountConfig:
    mountpoint: Path
    sources: tuple[Source, ...]
    # None: the mountpoint's own underlying directory, opened before mounting.
    store: Path | None = None
    prebaked: tuple[Path, ...] = ()
    allow_other: bool = False
    log_level: str = "info"
    # Kernel readahead for the mount (see mounttab.set_read_ahead): 1 MiB
    # makes sequential reads and mmap faults arrive as 1 MiB requests, the
    # most one FUSE request carries.  0 keeps the kernel's 128 KiB.
    read_ahead: int = MiB
    # None: no warm-up; () every file; else glob patterns (see prefetch.matcher).
    prefetch: tuple[str, ...] | None = None
    # Seconds between listings: new versions of a model appear within this
    # long, at the cost of one LIST per 1000 objects each time.  0: never.
    refresh: float = 60.0
    # Bytes of fetched files kept in the store (None: no limit).
    cache_max_size: int | None = None
    # Mapped pages of files being read, buffers of the GETs in flight (memlimit; mount.apply_memory_limit).
    memory_limit: int = memlimit.DEFAULT
    # user.lazyfs.* attributes (False: --no-xattrs, see fuse_ops).
    xattrs: bool = True
    # The kernel reads complete local copies itself (False: --no-passthrough),
    # and big files still downloading past its page cache (--no-direct-io).
    passthrough: bool = True
    direct_io: bool = True
    # Prometheus /metrics (None: off).  Loopback unless widened on purpose.
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    store_mode: StoreMode | None = None  # None: the store's own (DEFAULT_STORE_MODE for a new one)
    file_mode: int = DEFAULT_FILE_MODE
    lock: Lock | None = None  # --lock: serve exactly the versions it pins (pinned.py); None: what the listing shows
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
    store_mode: StoreMode | None = None  # None: the store's own (DEFAULT_STORE_MODE for a new one)
    file_mode: int = DEFAULT_FILE_MODE  # only its execute bits count, where store_mode lets read (store.py)
    lock: Lock | None = None  # --lock: bake exactly its versions (no listing); None: what the listing shows
    write_lock: Path | None = None  # --write-lock: make a lock first, bake exactly it, then write it here
    configs: tuple[ConfigRef, ...] = ()  # recorded in a lock made here
    memory_limit: int = memlimit.DEFAULT  # buffers of the ranged GETs in flight, as a mount's (memlimit)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)


@dataclass(frozen=True, slots=True)
class StatusConfig:
    sources: tuple[Source, ...]
    store: Path
    prebaked: tuple[Path, ...] = ()
    as_json: bool = False
    require_all: bool = False
    # --lock: judge the files against it, not against a listing (no request).
    lock: Lock | None = None
    # --verify content (with --lock): hash every file against the lock's
    # checksum, not only read its identity record.
    verify_content: bool = False
    remote: RemoteConfig = field(default_factory=RemoteConfig)


@dataclass(frozen=True, slots=True)
class LockConfig:
    sources: tuple[Source, ...]
    output: Path | None  # None: standard output
    configs: tuple[ConfigRef, ...] = ()
    remote: RemoteConfig = field(default_factory=RemoteConfig)


@dataclass(frozen=True, slots=True)
class DiffConfig:
    old: Lock
    new: Lock
    as_json: bool = False


@dataclass(frozen=True, slots=True)
class DoctorConfig:
    sources: tuple[Source, ...]
    mountpoint: Path
    store: Path
    allow_other: bool = False
    remote: RemoteConfig = field(default_factory=RemoteConfig)


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of config class `cls` (the one place it is stated)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(f"{cls.__name__} has no field {name}")


# -- values of flags, each checked once -------------------------------------------------


def endpoint(flag: str | None, env: Mapping[str, str]) -> str | None:
    """The endpoint the user chose, by the precedence boto3 documents."""
    for value in (flag, env.get("AWS_ENDPOINT_URL_S3"), env.get("AWS_ENDPOINT_URL")):
        if value:
            scheme = re.match(r"(?i)^(https?)://[^/\s]+", value)  # (a scheme is case-insensitive: HTTP:// too)
            if not scheme:
                raise BadEndpoint(f"endpoint \"{redact.url(value)}\" is not an http:// or https:// URL")
            return scheme[1].lower() + value[len(scheme[1]):]
    return None


def prefetch_patterns(everything: bool, globs: Sequence[str]) -> tuple[str, ...] | None:
    """None: no warm-up; (): every file; else the glob patterns to warm up."""
    patterns = tuple(g.strip() for g in globs)
    if any(not p for p in patterns):
        raise ConfigError("--prefetch-glob pattern is empty")
    if patterns:
        return patterns
    return () if everything else None


# -- whole configurations ------------------------------------------------------------------
#
# `args` holds the parsed options of one command (options.parse_options): flag
# values already checked, defaults filled in.


def remote_config(args: Mapping[str, Any], env: Mapping[str, str]) -> RemoteConfig:
    url = endpoint(args.get("endpoint_url"), env)
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    # Ranged GETs, plus the listings' parallel requests (catalog: up to 8 for
    # a refresh and 8 for lookups), plus a few for HEADs: no request ever
    # waits for, or throws away, a socket.
    pool = int(args.get("max_connections") or default_of(FetchConfig, "max_connections")) + 40
    return RemoteConfig(endpoint_url=url, region=region, addressing_style=args.get("addressing_style"),
                        max_pool_connections=pool,
                        max_attempts=_attempts(args, default_of(RemoteConfig, "max_attempts")),
                        etag_is_md5=not args.get("no_etag_check"),
                        instance_metadata=env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true",
                        read_timeout=args.get("read_timeout") or default_of(RemoteConfig, "read_timeout"))


def _attempts(args: Mapping[str, Any], default: int) -> int:
    """--retries N means N + 1 attempts (botocore's, and ours for a body that broke off)."""
    retries = args.get("retries")
    return default if retries is None else int(retries) + 1


def fetch_config(args: Mapping[str, Any], memory_limit: int = memlimit.DEFAULT) -> FetchConfig:
    """`memory_limit`: the command's --memory-limit (crtlimits.check_part_size)."""
    given: dict[str, Any] = {
        "part_size": args.get("part_size"), "max_connections": args.get("max_connections"),
        "chunk_attempts": _attempts(args, default_of(FetchConfig, "chunk_attempts")),
        "read_deadline": args.get("read_deadline"), "whole_file_open": args.get("whole_file_open"),
        "transfer_client": args.get("transfer_client"), "store_writes": args.get("store_writes")}
    cfg = FetchConfig(verify_prebaked=args.get("verify") == "etag", link_same_etag=not args.get("no_etag_check"),
                      model_readahead=args.get("model_readahead") is not False,
                      **{k: v for k, v in given.items() if v is not None})
    if cfg.transfer_client == "crt":  # a part size its client would refuse is a usage error, not its crash
        check_part_size(cfg.part_size, memory_limit)
    return cfg


def _sources(args: Mapping[str, Any], env: Mapping[str, str],
             lock: Lock | None = None) -> tuple[list[ModelJson], tuple[Source, ...]]:
    """The folders to serve, and the model.json files naming them.  A lock
    alone names its folders (and the configs it was made from); with
    --config or --prefix too, they must be the lock's."""
    configs = [load_model_json(p) for p in args.get("config") or ()]
    if lock is not None and not configs and not args.get("prefix"):
        return [ModelJson(Path(c.path), c.download_files_from, c.download_files_to) for c in lock.configs], \
            lock.sources
    bucket = args.get("bucket") or env.get("LAZYFS_BUCKET") or None
    sources = build_sources(configs, args.get("prefix") or (), bucket)
    if lock is not None:
        check_sources(lock, sources)
    return configs, sources


def read_lock(path: str | None) -> Lock | None:
    """The lock file a flag names, read and checked whole (lockfile.read)."""
    if path:
        check_answering(path, "lock file")
    return read(Path(path)) if path else None


def _config_refs(configs: Sequence[ModelJson]) -> tuple[ConfigRef, ...]:
    return tuple(ConfigRef(str(c.path), c.download_files_from, c.download_files_to) for c in configs)


def _layers(paths: Sequence[str]) -> tuple[Path, ...]:
    layers = tuple(Path(os.path.abspath(p)) for p in paths)
    for layer in layers:
        check_directory(layer, "prebaked layer")
    return layers


def mount_config(args: Mapping[str, Any], env: Mapping[str, str]) -> MountConfig:
    """The whole mount configuration from parsed options and the environment."""
    lock = read_lock(args.get("lock"))
    configs, sources = _sources(args, env, lock)
    mnt = resolve_mountpoint(args.get("mountpoint"), configs)
    if not is_fuse_mount(mnt):
        check_directory(mnt, "mountpoint")
    store = Path(os.path.abspath(args["store"])) if args.get("store") else None
    if store is not None:  # a mount (a live one, say JuiceFS) will do
        check_directory(store, "store", missing_ok=True)
    values = {name: args[name] for name in ("allow_other", "log_level", "read_ahead", "refresh", "cache_max_size",
                                            "memory_limit", "xattrs", "passthrough", "direct_io",
                                            "metrics_port", "metrics_addr", "store_mode", "file_mode")
              if args.get(name) is not None}
    fetch = fetch_config(args, values.get("memory_limit", memlimit.DEFAULT))
    return MountConfig(mountpoint=mnt, sources=sources, store=store, prebaked=_layers(args.get("prebaked") or ()),
                       prefetch=prefetch_patterns(bool(args.get("prefetch")), args.get("prefetch_glob") or ()),
                       lock=lock, remote=remote_config(args, env), fetch=fetch, **values)


def bake_config(args: Mapping[str, Any], env: Mapping[str, str]) -> BakeConfig:
    lock = read_lock(args.get("lock"))
    if lock is not None and args.get("write_lock"):
        raise ConfigError("--write-lock makes a new lock of what the listing shows; with --lock the lock exists "
                          "already (give one of them)")
    configs, sources = _sources(args, env, lock)
    to = resolve_mountpoint(args.get("to"), configs)
    if not is_fuse_mount(to):  # a mount is refused by bake itself
        check_directory(to, "--to folder", missing_ok=True)
    memory, file_mode = args.get("memory_limit") or memlimit.DEFAULT, args.get("file_mode") or DEFAULT_FILE_MODE
    return BakeConfig(sources=sources, target=to, log_level=args.get("log_level") or "info", lock=lock,
                      store_mode=args.get("store_mode"), file_mode=file_mode,
                      write_lock=output_file(args.get("write_lock"), "--write-lock"), configs=_config_refs(configs),
                      memory_limit=memory, remote=remote_config(args, env), fetch=fetch_config(args, memory))


def status_config(args: Mapping[str, Any], env: Mapping[str, str]) -> StatusConfig:
    lock = read_lock(args.get("lock"))
    if args.get("verify") == "content" and lock is None:
        raise ConfigError("--verify content needs --lock: the lock holds the checksums the files are checked against")
    configs: list[ModelJson] = []
    sources: tuple[Source, ...] = ()  # none given, of a running mount: it names its own (status.from_mount)
    mnt = args.get("mountpoint")  # the mount running there, else its store: --store, else the folder beneath it
    given = mnt if mnt and (is_lazyfs_mount(Path(os.path.abspath(mnt))) or not args.get("store")) else args.get("store")
    what, path = "mountpoint" if mnt and given == mnt else "store", Path(os.path.abspath(given or DEFAULT_CACHE_DIR))
    if given:  # first: a path that is no folder says so, not "nothing to serve"
        check_target(path, what)
    if lock is not None or args.get("config") or args.get("prefix") or not is_lazyfs_mount(path):
        configs, sources = _sources(args, env, lock)
        path = path if given else resolve_mountpoint(None, configs)
    if not given:  # the default mount, or the configs' download_files_to
        check_target(path, what)
    return StatusConfig(sources=sources, store=path, prebaked=_layers(args.get("prebaked") or ()),
                        as_json=bool(args.get("json")), require_all=bool(args.get("require_all")), lock=lock,
                        verify_content=args.get("verify") == "content", remote=remote_config(args, env))


def lock_config(args: Mapping[str, Any], env: Mapping[str, str]) -> LockConfig:
    configs, sources = _sources(args, env)
    given = args.get("output")
    if given == "-":
        output = None
    elif given:
        output = output_file(given, "--output")
    elif configs:
        first = configs[0].path
        output = output_file(str(first.with_name(first.name.removesuffix(".json") + ".lock.json")), "--output")
    else:
        output = output_file("lazyfs.lock.json", "--output")
    return LockConfig(sources=sources, output=output, configs=_config_refs(configs), remote=remote_config(args, env))


def diff_config(args: Mapping[str, Any]) -> DiffConfig:
    old, new = read_lock(args["old"]), read_lock(args["new"])
    assert old is not None and new is not None  # required arguments
    return DiffConfig(old=old, new=new, as_json=bool(args.get("json")))


def doctor_config(args: Mapping[str, Any], env: Mapping[str, str]) -> DoctorConfig:
    configs, sources = _sources(args, env)
    mnt = resolve_mountpoint(args.get("mountpoint"), configs)
    store = Path(os.path.abspath(args["store"])) if args.get("store") else mnt
    return DoctorConfig(sources=sources, mountpoint=mnt, store=store, allow_other=bool(args.get("allow_other")),
                        remote=remote_config(args, env))


# What other modules import from here though it is defined elsewhere.
__all__ = ["DEFAULT_CACHE_DIR", "ConfigError", "Source", "parse_size"]
