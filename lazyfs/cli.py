"""Command line: subcommands, argv and environment into configuration, and the
one place where exceptions become exit codes.

Exit codes: 0 success; 1 runtime failure (object store refused or unreachable,
mount failed); 2 usage or configuration error.  Every error is one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any, NoReturn, Sequence

from lazyfs import __version__
from lazyfs.config import DEFAULT_CACHE_DIR, LOG_LEVELS, bake_config, doctor_config, mount_config, status_config
from lazyfs.errors import ConfigError, LazyfsError, UsageError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("lazyfs")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lazyfs", description="Present S3 folders as local read-only files, "
                     "fetched on first use and kept on disk.")
    parser.add_argument("--version", action="version", version=f"lazyfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    m = sub.add_parser("mount", help="mount S3 folders (runs in the foreground)",
                       description="Mount the S3 folders named by model.json files or --prefix. "
                       "Runs in the foreground; SIGTERM or SIGINT unmounts and exits 0.")
    m.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT",
                   help=f"where to mount (default: the config's download_files_to, else {DEFAULT_CACHE_DIR})")
    _add_source_args(m)
    m.add_argument("--store", metavar="DIR", help="where fetched files persist (default: the "
                   "mountpoint's own directory, used from underneath the mount)")
    m.add_argument("--prebaked", metavar="DIR", action="append", default=[],
                   help="read-only folder of files already on disk, same layout (repeatable)")
    m.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    _add_transfer_args(m)
    m.add_argument("--read-deadline", metavar="SECONDS", type=float,
                   help="longest a read waits for its bytes before failing with EIO (default 60)")
    m.add_argument("--prefetch", action="store_true",
                   help="as soon as the mount is up, fetch every file in the background at the full "
                   "parallel rate; files someone is reading go first")
    m.add_argument("--prefetch-glob", metavar="PATTERN", action="append", default=[],
                   help="prefetch only files matching this glob (a name like '*.safetensors', or a "
                   "path below the folder like 'llm/*'); repeatable, implies --prefetch")
    m.add_argument("--verify", choices=("size", "etag"), default="size",
                   help="how a local copy with no identity record (an admin's prebaked file) is "
                   "judged: by size, as the seed describes (default), or by content against the "
                   "object's checksum or ETag (once; the result is recorded)")
    m.add_argument("--cache-max-size", metavar="SIZE",
                   help="keep at most this much fetched data in the store (e.g. 50G), evicting the "
                   "least recently used files nobody has open; prebaked files are never evicted")
    m.add_argument("--no-xattrs", dest="xattrs", action="store_false",
                   help="no user.lazyfs.* attributes: `ls -l` then costs no extra round trips per file "
                   "(for trees of many thousands of files)")
    m.add_argument("--memory-limit", metavar="SIZE",
                   help="memory for mapped file pages and transfer buffers, on top of Python's own "
                   "(~100 MiB); fewer parallel GETs when small (default 256MiB)")
    m.add_argument("--metrics-port", metavar="PORT", type=int,
                   help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics")
    m.add_argument("--metrics-addr", metavar="ADDR", default="127.0.0.1",
                   help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 to widen)")
    m.add_argument("--refresh", metavar="SECONDS", type=float,
                   help="list the folders again this often to pick up new versions "
                   "(default 60; 0: only on SIGHUP)")
    m.add_argument("--read-ahead", metavar="SIZE",
                   help="kernel readahead for the mount (default 1MiB; 0 keeps the kernel's)")
    _add_log_args(m)
    m.set_defaults(func=_cmd_mount)

    b = sub.add_parser("bake", help="download every file into a folder, for a production image",
                       description="Fetch every object under the configured folders into DIR, laid "
                       "out as the mount shows it, skipping files already current.  Exits 1 if "
                       "anything failed.")
    _add_source_args(b)
    b.add_argument("--to", metavar="DIR", help="target folder (default: the config's "
                   f"download_files_to, else {DEFAULT_CACHE_DIR})")
    _add_transfer_args(b)
    _add_log_args(b)
    b.set_defaults(func=_cmd_bake)

    st = sub.add_parser("status", help="which files are on disk and current (readiness probe)",
                        description="Per file: remote size and local state (current, prebaked, stale, "
                        "partial, missing), and totals.  Works on a store folder or a running mount.")
    _add_source_args(st)
    st.add_argument("--store", metavar="DIR", help="the store folder (default: the config's "
                    f"download_files_to, else {DEFAULT_CACHE_DIR}; a running mount there is asked directly)")
    st.add_argument("--prebaked", metavar="DIR", action="append", default=[],
                    help="read-only layers searched after the store (repeatable)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--require-all", action="store_true",
                    help="exit 1 unless every file is current or prebaked")
    _add_log_args(st)
    st.set_defaults(func=_cmd_status)

    d = sub.add_parser("doctor", help="check what a mount needs, one line each with a fix",
                       description="Check /dev/fuse, fusermount3, allow_other, the mountpoint, the store, "
                       "credentials, the endpoint, and that each folder lists.  Exit 0 when all pass.")
    d.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT",
                   help=f"as for mount (default: the config's download_files_to, else {DEFAULT_CACHE_DIR})")
    _add_source_args(d)
    d.add_argument("--store", metavar="DIR", help="as for mount (default: the mountpoint)")
    d.add_argument("--allow-other", action="store_true", help="also check that --allow-other can work")
    _add_log_args(d)
    d.set_defaults(func=_cmd_doctor)

    u = sub.add_parser("umount", help="unmount a lazyfs mount",
                       description="Unmount a lazyfs mount (the daemon then exits 0).")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--lazy", action="store_true", help="detach now even if files are open (umount -l)")
    _add_log_args(u)
    u.set_defaults(func=_cmd_umount)
    return parser


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", action="append", default=[],
                   help="a model.json naming download_files_from (repeatable)")
    p.add_argument("--bucket", metavar="NAME", help="bucket for plain folders (default: $LAZYFS_BUCKET)")
    p.add_argument("--prefix", metavar="PREFIX", action="append", default=[],
                   help="an S3 folder to serve, plain or s3://bucket/folder (repeatable)")
    p.add_argument("--endpoint-url", metavar="URL",
                   help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, or AWS)")
    p.add_argument("--addressing-style", choices=("auto", "path", "virtual"),
                   help="bucket addressing (default: path with --endpoint-url, else auto)")


def _add_transfer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part-size", metavar="SIZE", help="bytes per ranged GET (default 8MiB)")
    p.add_argument("--max-connections", metavar="N", type=int,
                   help="ranged GETs in flight at once (default 16)")
    p.add_argument("--retries", metavar="N", type=int,
                   help="retries of a failed request, with exponential backoff and jitter (default 4)")
    p.add_argument("--read-timeout", metavar="SECONDS", type=float,
                   help="a response that sends no byte for this long is a stalled connection, "
                   "retried (default 20)")


def _add_log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS,
                   help="log verbosity on stderr (default: info)")
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="text for people, json (one object per line) for log collectors")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the
    structured fields some lines carry (key, bytes, seconds, mbps, source)."""

    FIELDS = ("event", "key", "bytes", "seconds", "mbps", "source")

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for name in self.FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # botocore's debug output carries request headers; keep it out of our logs.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_mount(args: argparse.Namespace) -> int:
    from lazyfs import mount  # imports pyfuse3: only for the commands that mount

    cfg = mount_config(mountpoint=args.mountpoint, config_files=args.config, prefixes=args.prefix,
                       bucket=args.bucket, endpoint_url=args.endpoint_url, store=args.store,
                       prebaked=args.prebaked, allow_other=args.allow_other, log_level=args.log_level,
                       addressing_style=args.addressing_style, part_size=args.part_size,
                       max_connections=args.max_connections, env=os.environ,
                       read_ahead=args.read_ahead, prefetch=args.prefetch,
                       prefetch_globs=args.prefetch_glob, refresh=args.refresh,
                       verify=args.verify, cache_max_size=args.cache_max_size,
                       metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
                       retries=args.retries, read_timeout=args.read_timeout,
                       read_deadline=args.read_deadline, memory_limit=args.memory_limit,
                       xattrs=args.xattrs)
    return mount.run(cfg)


def _cmd_bake(args: argparse.Namespace) -> int:
    from lazyfs import bake

    cfg = bake_config(target=args.to, config_files=args.config, prefixes=args.prefix,
                      bucket=args.bucket, endpoint_url=args.endpoint_url,
                      addressing_style=args.addressing_style, part_size=args.part_size,
                      max_connections=args.max_connections, log_level=args.log_level, env=os.environ,
                      retries=args.retries, read_timeout=args.read_timeout)
    return bake.run(cfg)


def _cmd_status(args: argparse.Namespace) -> int:
    from lazyfs import status

    cfg = status_config(store=args.store, config_files=args.config, prefixes=args.prefix,
                        bucket=args.bucket, endpoint_url=args.endpoint_url,
                        addressing_style=args.addressing_style, prebaked=args.prebaked,
                        as_json=args.json, require_all=args.require_all, env=os.environ)
    return status.run(cfg)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from lazyfs import doctor

    cfg = doctor_config(mountpoint=args.mountpoint, config_files=args.config, prefixes=args.prefix,
                        bucket=args.bucket, endpoint_url=args.endpoint_url,
                        addressing_style=args.addressing_style, store=args.store,
                        allow_other=args.allow_other, env=os.environ)
    return doctor.run(cfg)


def _cmd_umount(args: argparse.Namespace) -> int:
    from lazyfs.mounttab import MountError, find_mount, unmount

    path = os.path.abspath(args.mountpoint)
    entry = find_mount(path)
    if entry is None:
        raise MountError(f"{path} is not mounted")
    if not entry.fstype.startswith("fuse"):
        raise MountError(f"{path} is a {entry.fstype} mount, not lazyfs")
    unmount(path, lazy=args.lazy)
    print(f"lazyfs: unmounted {path}")
    return EXIT_OK


def _stop(signum: int, frame: Any) -> NoReturn:
    # Before the mount is up there is nothing to clean up: a container stop
    # during start-up is still a clean exit.
    raise SystemExit(EXIT_OK)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    try:
        return _run(argv)
    finally:
        # Exiting already: a second SIGTERM or Ctrl-C (a container stop sent
        # twice) must not interrupt the interpreter's own clean-up.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        setup_logging(args.log_level, args.log_format)
        return int(args.func(args))
    except ConfigError as e:
        print(f"lazyfs: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LazyfsError as e:
        print(f"lazyfs: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as e:  # a bug: say so in one line, keep the traceback for debug logs
        log.debug("internal error", exc_info=True)
        print(f"lazyfs: internal error: {type(e).__name__}: {e} (rerun with --log-level debug "
              "for details)", file=sys.stderr)
        return EXIT_RUNTIME
