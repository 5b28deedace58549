"""Every command-line flag, spelled once: its name, help, how its value is
checked, and where its default lives (a field of a config class, shown in
`--help` from there).  cli.py builds the parsers from these tables;
config.py builds the configurations from what they parsed.  README's flag
tables follow these (tests/unit/test_options.py checks that none is missing).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, get_args

from lazyfs import memlimit
from lazyfs.config import (
    LOG_LEVELS,
    FetchConfig,
    MiB,
    MountConfig,
    RemoteConfig,
    StoreMode,
    default_of,
    parse_size,
)
from lazyfs.errors import ConfigError
from lazyfs.modeljson import DEFAULT_CACHE_DIR
from lazyfs.sizes import echoed, flag_size


@dataclass(frozen=True)
class Option:
    flag: str  # "--part-size", or a positional's name ("mountpoint")
    help: str
    metavar: str | None = None
    # value | flag (store_true) | off (store_false) | append | positional (optional) | argument (required)
    kind: str = "value"
    type: Callable[[str], Any] = str  # argparse's conversion (str, int, float)
    choices: tuple[str, ...] = ()
    # Text -> checked value, ConfigError (one sentence naming the flag) if bad.
    check: Callable[[Any, str], Any] | None = None
    # Where the default lives, for --help: (config class, field[, shown as]).
    default: tuple[Any, ...] | None = None
    dest: str = ""
    short: str = ""  # a one-letter alias ("-o")

    @property
    def name(self) -> str:
        return self.dest or self.flag.lstrip("-").replace("-", "_")

    def help_text(self) -> str:
        if self.default is None:
            return self.help
        cls, field, *show = self.default
        value = default_of(cls, field)
        shown = show[0](value) if show else f"{value:g}" if isinstance(value, float) else value
        return f"{self.help} (default {shown})"


def parse_options(options: Sequence[Option], raw: Mapping[str, Any]) -> dict[str, Any]:
    """The checked value of each option given; None where it was not."""
    out: dict[str, Any] = {}
    for opt in options:
        value = raw.get(opt.name)
        if value is not None and opt.check is not None:
            value = opt.check(value, opt.flag)
        out[opt.name] = value
    return out


def _refresh(value: float, flag: str) -> float:
    if not value >= 0:  # negative, or NaN
        raise ConfigError(f"{flag} {value:g} must be 0 (never) or a number of seconds")
    return value


_HOST_NAME = re.compile(r"(?i)(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z]([a-z0-9-]{0,61}[a-z0-9])?\.?")


def _address(value: str, flag: str) -> str:
    """An IP address or a host name to listen on; `999.1.1.1` or `a b` is a usage error (exit 2),
    not a failure to serve found once the mount has started (exit 1)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOST_NAME.fullmatch(value):
            raise ConfigError(f"{flag} {value!r} is neither an IP address nor a host name") from None
    return value


def size_within(minimum: int, maximum: int | None = None, why: str = "") -> Any:
    """A size of at least `minimum` (and at most `maximum`, for the reason
    `why`), else one sentence naming the flag."""
    def parse(text: str, flag: str) -> int:
        value = parse_size(text, flag)
        if value < minimum:
            raise ConfigError(f"{flag} {echoed(text)} is too small (at least {flag_size(minimum)})")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{flag} {echoed(text)} is too large (at most {flag_size(maximum)}{why})")
        return value
    return parse


# The smallest --cache-max-size: one download block (FetchConfig.block_size at most), the unit a
# download keeps its state in.  A budget keeps only files no larger than itself (a larger one streams
# through and is dropped, budget.py), so below this it keeps no file of a model but its smallest
# (a config.json), every other open downloading its file again: a mistyped unit ("1" for 1 GiB), as 0 is.
CACHE_MIN = MiB


def _cache_max_size(text: str, flag: str) -> int:
    """A budget that keeps something: under one block (0 above all) every
    open would download its file again, and a user writing it may as well
    have meant another unit, or "no limit"."""
    value = parse_size(text, flag)
    if value < CACHE_MIN:
        raise ConfigError(f"{flag} {echoed(text)} would keep next to nothing: the budget must be at least "
                          f"{flag_size(CACHE_MIN)}, one download block (leave the flag out for no budget)")
    return value


# The kernel keeps readahead in 4 KiB pages, and a first read or mmap fault of
# a cold file waits for a whole window of it: --read-ahead 1G made a 7-byte
# mmap read wait 12-16 s.  16 MiB is sixteen of the largest FUSE request.
READ_AHEAD_MAX = 16 * MiB


def _read_ahead(text: str, flag: str) -> int:
    value = parse_size(text, flag)
    if value and (value % 4096 or value > READ_AHEAD_MAX):
        raise ConfigError(f"{flag} {echoed(text)} must be 0 (the kernel's 128KiB) or a multiple of 4KiB up to "
                          f"{flag_size(READ_AHEAD_MAX)}")
    return value


def in_range(low: float, high: float, unit: str = "", low_open: bool = False) -> Any:
    """A number within [low, high] (or (low, high]), else one sentence naming the flag."""
    bounds = f"more than {low:g} and at most {high:g}{unit}" if low_open else f"between {low:g} and {high:g}{unit}"

    def check(value: float, flag: str) -> float:
        if not low <= value <= high or (low_open and value == low):  # NaN fails too
            raise ConfigError(f"{flag} {value:g} must be {bounds}")
        return value
    return check


_RETRIES_SHOWN = (RemoteConfig, "max_attempts", lambda attempts: attempts - 1)
_DEFAULT_LOCATION = f"the config's download_files_to, else {DEFAULT_CACHE_DIR}"

SOURCE = (
    Option("--config", "a model.json naming download_files_from (repeatable)", "FILE", kind="append"),
    Option("--bucket", "bucket for plain folders (default: $LAZYFS_BUCKET)", "NAME"),
    Option("--prefix", "an S3 folder to serve, plain or s3://bucket/folder (repeatable)", "PREFIX", kind="append"),
    Option("--endpoint-url", "S3 endpoint (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, or AWS)", "URL"),
    Option("--addressing-style", "bucket addressing (default: path with an endpoint, else auto)",
           choices=("auto", "path", "virtual")),
)

TRANSFER = (
    Option("--part-size", "bytes per ranged GET of the sequential sweep, 64KiB to 5GiB (with --transfer-client "
           "crt, up to a quarter of --memory-limit, and 128MiB whatever it is)", "SIZE",
           check=size_within(64 * 1024, 5 << 30, ": S3's largest part"),
           default=(FetchConfig, "part_size", flag_size)),
    Option("--max-connections", "ranged GETs in flight at once", "N", type=int,
           check=in_range(1, 256), default=(FetchConfig, "max_connections")),
    Option("--retries", "retries of a failed request, with exponential backoff and jitter", "N", type=int,
           check=in_range(0, 20), default=_RETRIES_SHOWN),
    Option("--transfer-client", "who sends the ranged GETs: boto3 (Python threads) or crt (awscrt's C S3 "
           "client); listings and HEADs always use boto3", choices=("boto3", "crt"),
           default=(FetchConfig, "transfer_client")),
    Option("--store-writes", "how downloaded bytes reach the store: direct (O_DIRECT, past the page cache, "
           "for a file nobody reads through lazyfs as it fills, such as a shard a whole-file open waits for; "
           "verification reads it back the same way) or buffered (always through the page cache: better when "
           "the store's disk is much slower than the network); a filesystem that refuses O_DIRECT gets buffered "
           "writes", choices=("direct", "buffered"), default=(FetchConfig, "store_writes")),
    Option("--read-timeout", "a response that sends no byte for this long is a stalled connection, retried",
           "SECONDS", type=float, check=in_range(0, 3600, " seconds", low_open=True),
           default=(RemoteConfig, "read_timeout")),
)

ETAG_CHECK = Option(
    "--no-etag-check", "do not take an ETag for the content's MD5: for an S3-compatible store whose ETags are "
    "not MD5 digests (a download that matches no ETag fails with EIO otherwise).  Checksums the store returns "
    "(CRC32, CRC32C, CRC64NVME, SHA) are still checked; a file with none is published unverified", kind="flag")

STORE_MODE = Option(
    "--store-mode", "who may read the store beneath the mount: its folders and files are private (0700, files "
    "0400), group (0750, 0440) or public (0755, 0444); a store of another mode is changed to it (default: the "
    "mode the store has; private for a new one)", choices=get_args(StoreMode))



def _file_mode(text: str, flag: str) -> int:
    """Octal permission bits a read-only file can have: read and execute."""
    digits = text.strip().removeprefix("0o")
    if not re.fullmatch("[0-7]{1,12}", digits):  # as chmod takes it: 555, 0555, 00555
        raise ConfigError(f"{flag} {echoed(text)} is not an octal mode such as 0444 or 0555")
    mode = int(digits, 8)
    if mode & ~0o777 or mode & 0o222:
        raise ConfigError(f"{flag} {echoed(text)} has bits a read-only file cannot have: use read (4) and execute "
                          "(1) bits only, such as 0444 or 0555")
    if not mode & 0o400:
        raise ConfigError(f"{flag} {echoed(text)} would keep the files' owner from reading them (give 0400)")
    return mode


FILE_MODE = Option(
    "--file-mode", "permission bits of the files (S3 keeps none), octal: read and execute bits only, 0555 to run "
    "programs from the mount; a local copy that is executable keeps its execute bits", "MODE", check=_file_mode,
    default=(MountConfig, "file_mode", lambda mode: f"{mode:04o}"))

LOGGING = (
    Option("--log-level", "log verbosity on stderr (default info)", type=str.lower, choices=LOG_LEVELS),
    Option("--log-format", "text for people, json (one object per line) for log collectors (default text)",
           choices=("text", "json")),
)

MEMORY_LIMIT = Option(
    "--memory-limit", "memory for transfer buffers (and a mount's mapped file pages), on top of Python's own "
    f"(~100 MiB), {flag_size(memlimit.SMALLEST)} to {flag_size(memlimit.LARGEST)}; fewer parallel GETs when small "
    "(with --transfer-client crt, half of it is the client's buffers)", "SIZE",
    check=size_within(memlimit.SMALLEST, memlimit.LARGEST, ": more memory than any machine has"),
    default=(MountConfig, "memory_limit", flag_size))

LOCK_FILE = Option("--lock", "serve exactly the versions this lock file pins (lazyfs lock): the listing comes "
                   "from the lock (no request at start), each file is fetched by its version id or pinned by "
                   "If-Match to its ETag and checked against the lock's checksum; a refresh only reports drift",
                   "FILE")

MOUNT = (
    Option("mountpoint", f"where to mount (default: {_DEFAULT_LOCATION})", "MOUNTPOINT", kind="positional"),
    *SOURCE,
    LOCK_FILE,
    Option("--store", "where fetched files persist (default: the mountpoint's own directory, used from "
           "underneath the mount)", "DIR"),
    Option("--prebaked", "read-only folder of files already on disk, same layout (repeatable)", "DIR",
           kind="append"),
    Option("--allow-other", "let other users read the mount", kind="flag"),
    STORE_MODE,
    FILE_MODE,
    *TRANSFER,
    ETAG_CHECK,
    Option("--read-deadline", "longest a read waits for its bytes before failing with EIO", "SECONDS",
           type=float, check=in_range(0, 86400, " seconds", low_open=True), default=(FetchConfig, "read_deadline")),
    Option("--prefetch", "as soon as the mount is up, fetch every file in the background at the full parallel "
           "rate; files someone is reading go first", kind="flag"),
    Option("--prefetch-glob", "prefetch only files matching this glob (a name like '*.safetensors', or a path "
           "below the folder like 'llm/*'); repeatable, implies --prefetch", "PATTERN", kind="append"),
    Option("--verify", "how a local copy with no identity record (an admin's prebaked file) is judged: by size, "
           "as the seed describes, or by content against the object's checksum or ETag (once; the result is "
           "recorded) (default size; with --lock always by content, against the lock)", choices=("size", "etag")),
    Option("--cache-max-size", "keep at most this much fetched data in the store (e.g. 50G), evicting the least "
           f"recently used files nobody has open; prebaked files are never evicted; at least {flag_size(CACHE_MIN)} "
           "(default: no limit)", "SIZE", check=_cache_max_size),
    Option("--no-model-readahead", "fetch .safetensors files in file order, do not start a sharded "
           "checkpoint's next shard when one is read through, and do not fetch a model folder's small files "
           "when its config.json is opened (by default lazyfs reads the header and fetches tensors in the "
           "order loaders read them)", kind="off", dest="model_readahead"),
    Option("--whole-file-open", "which opens of a file still downloading wait for all of it, after which "
           "the kernel reads the local copy at disk speed (passthrough) where lazyfs would serve each read as "
           "the bytes arrive: checkpoint (the shards of a sharded safetensors checkpoint whose index a loader "
           "opened, or whose previous shard it read through), always (every file: a first byte then waits "
           "for the last) or never (default checkpoint)", choices=("checkpoint", "always", "never"),
           default=(FetchConfig, "whole_file_open")),
    Option("--no-xattrs", "no user.lazyfs.* attributes: `ls -l` then costs no extra round trips per file "
           "(for trees of many thousands of files)", kind="off", dest="xattrs"),
    Option("--no-passthrough", "serve every read through lazyfs; by default the kernel reads a file whose local "
           "copy is complete straight from it (FUSE passthrough: Linux 6.9+, a pyfuse3 built by "
           "scripts/native/build-pyfuse3; never for copies on network or FUSE filesystems)", kind="off",
           dest="passthrough"),
    Option("--no-direct-io", "read files still downloading through the mount's page cache; by default a reader "
           "of a file of 64 MiB or more gets its bytes copied straight into its buffer, once (a reader of "
           "small blocks then sends lazyfs one request per block)", kind="off", dest="direct_io"),
    MEMORY_LIMIT,
    Option("--metrics-port", "serve Prometheus metrics at http://ADDR:PORT/metrics (default: off)", "PORT",
           type=int, check=in_range(1, 65535)),
    Option("--metrics-addr", "address for --metrics-port (0.0.0.0 to widen)", "ADDR", check=_address,
           default=(MountConfig, "metrics_addr")),
    Option("--refresh", "list the folders again this often to pick up new versions (0: only on SIGHUP)",
           "SECONDS", type=float, check=_refresh, default=(MountConfig, "refresh")),
    Option("--read-ahead", f"kernel readahead for the mount, a multiple of 4KiB up to {flag_size(READ_AHEAD_MAX)} "
           "(0 keeps the kernel's 128KiB)", "SIZE", check=_read_ahead, default=(MountConfig, "read_ahead", flag_size)),
    *LOGGING,
)

BAKE = (
    *SOURCE,
    Option("--lock", "bake exactly the versions this lock file pins (no listing): by version id, or If-Match on "
           "the locked ETag, each checked against the lock's checksum", "FILE"),
    Option("--write-lock", "make a lock of the folders first (as lazyfs lock does), bake exactly it, then write "
           "it to FILE", "FILE"),
    Option("--to", f"target folder (default: {_DEFAULT_LOCATION})", "DIR"),
    STORE_MODE,
    Option("--file-mode", "execute bits of the baked files, octal (read comes from --store-mode): 0555 to run "
           "programs from the image, with and without a mount; read and execute bits only", "MODE", check=_file_mode,
           default=(MountConfig, "file_mode", lambda mode: f"{mode:04o}")),
    *TRANSFER,
    MEMORY_LIMIT,
    ETAG_CHECK,
    *LOGGING,
)

LOCK = (
    *SOURCE,
    ETAG_CHECK,
    Option("--output", "where to write the lock; - for standard output (default: beside the first --config, "
           "model.json -> model.lock.json, else ./lazyfs.lock.json)", "FILE", short="-o"),
    *LOGGING,
)

DIFF = (
    Option("old", "the lock served now", "OLD.lock", kind="argument"),
    Option("new", "the lock to switch to", "NEW.lock", kind="argument"),
    Option("--json", "machine-readable output", kind="flag"),
    *LOGGING,
)

STATUS = (
    Option("mountpoint", "the lazyfs mount to report on, as `df MOUNTPOINT` takes it: a running mount there is "
           "asked; else its store is read (--store, else the folder itself, as the mount's default store)",
           "MOUNTPOINT", kind="positional"),
    *SOURCE,
    Option("--store", f"the store folder (default: {_DEFAULT_LOCATION}; a running mount there is asked "
           "directly)", "DIR"),
    Option("--prebaked", "read-only layers searched after the store (repeatable)", "DIR", kind="append"),
    Option("--json", "machine-readable output", kind="flag"),
    Option("--require-all", "exit 1 unless every file is cached or prebaked (with --lock: recorded as the "
           "locked version, or its content checked)", kind="flag"),
    Option("--lock", "judge the store against this lock file, not a listing (no request to S3); on a mount, "
           "the mount must serve this very lock", "FILE"),
    Option("--verify", "with --lock: prove a file is the locked version by its identity record (record), or by "
           "hashing its content against the lock's checksum (content; a progress bar on a terminal) "
           "(default record)", choices=("record", "content")),
    *LOGGING,
)

DOCTOR = (
    Option("mountpoint", f"as for mount (default: {_DEFAULT_LOCATION})", "MOUNTPOINT", kind="positional"),
    *SOURCE,
    Option("--store", "as for mount (default: the mountpoint)", "DIR"),
    Option("--allow-other", "also check that --allow-other can work", kind="flag"),
    *LOGGING,
)

UMOUNT = (
    Option("mountpoint", "the lazyfs mount to unmount", "MOUNTPOINT", kind="argument"),
    Option("--lazy", "detach now even if files are open (umount -l)", kind="flag"),
    Option("--force", "abort the mount's kernel connection, then detach it (umount -f -l): for a mount whose "
           "daemon is gone or hung; processes waiting on it get an error at once", kind="flag"),
    *LOGGING,
)
