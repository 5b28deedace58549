"""Command line: subcommands, argv and environment into configuration, and the
one place where exceptions become exit codes.

Exit codes: 0 success (a mount stopped by SIGTERM or SIGINT too); 1 runtime
failure (object store refused or unreachable, mount failed); 2 usage or
configuration error; 128+signal (130, 143) any other command stopped by
SIGINT or SIGTERM before it finished; 141 (128+SIGPIPE) stdout closed by its
reader.  Every error is one line on stderr (what a message quotes from a
file, a listing or argv cannot break it: wording.one_line), never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import select
import signal
import sys
from typing import Any, NoReturn, Sequence

from lazyfs import __version__, interrupt, options, redact
from lazyfs.config import bake_config, diff_config, doctor_config, lock_config, mount_config, status_config
from lazyfs.errors import ConfigError, Interrupted, LazyfsError, UsageError, thread_limit
from lazyfs.exhausted import DESCRIPTOR_ERRNOS, descriptor_errno, descriptors, not_a_daemon, remedy
from lazyfs.options import Option
from lazyfs.wording import one_line

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
# Output nobody reads any more (`lazyfs status | head`): 128 + SIGPIPE, what a
# command killed by SIGPIPE (ls, cat) reports.
EXIT_OUTPUT_CLOSED = 128 + signal.SIGPIPE

log = logging.getLogger("lazyfs")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see: {self.prog} --help)")


COMMANDS: dict[str, tuple[Sequence[Option], str, str]] = {
    "mount": (options.MOUNT, "mount S3 folders (runs in the foreground)",
              "Mount the S3 folders named by model.json files or --prefix. Runs in the foreground; "
              "SIGTERM or SIGINT unmounts and exits 0."),
    "bake": (options.BAKE, "download every file into a folder, for a production image",
             "Fetch every object under the configured folders into DIR, laid out as the mount shows it, "
             "skipping files already current.  Exits 1 if anything failed."),
    "status": (options.STATUS, "which files are on disk and current (readiness probe)",
               "Per file: remote size and local state (cached, prebaked, downloading, partial, stale, "
               "missing), and totals.  Works on a store folder or a running mount."),
    "lock": (options.LOCK, "pin the configured folders' current versions in a lock file",
             "List the configured folders and write a lock: every object's key, size, ETag, version id (when "
             "the bucket keeps versions), Last-Modified and checksum, the config it came from, and a digest of "
             "the whole.  mount, bake and status take it with --lock."),
    "diff": (options.DIFF, "what switching from one lock to another downloads",
             "Compare two locks: the files a switch from OLD to NEW downloads, and those whose bytes the old "
             "version has already (linked by the store's content index, not downloaded).  No request to S3."),
    "doctor": (options.DOCTOR, "check what a mount needs, one line each with a fix",
               "Check /dev/fuse, fusermount3, allow_other, the mountpoint, the store, credentials, the "
               "endpoint, and that each folder lists.  Exit 0 when all pass."),
    "umount": (options.UMOUNT, "unmount a lazyfs mount", "Unmount a lazyfs mount (the daemon then exits 0)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lazyfs", description="Present S3 folders as local read-only files, "
                     "fetched on first use and kept on disk.")
    parser.add_argument("--version", action="version", version=f"lazyfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (opts, summary, description) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=description)
        for opt in opts:
            _add(p, opt)
    return parser


def _add(p: argparse.ArgumentParser, opt: Option) -> None:
    kw: dict[str, Any] = {"help": opt.help_text()}
    if opt.kind in ("positional", "argument"):
        p.add_argument(opt.name, nargs="?" if opt.kind == "positional" else None, metavar=opt.metavar, **kw)
        return
    kw["dest"] = opt.name
    names = (opt.short, opt.flag) if opt.short else (opt.flag,)
    if opt.kind == "flag":
        p.add_argument(*names, action="store_true", default=None, **kw)
    elif opt.kind == "off":
        p.add_argument(*names, action="store_false", default=None, **kw)
    else:
        kw.update(metavar=opt.metavar, type=opt.type)
        if opt.choices:
            kw["choices"] = opt.choices
        p.add_argument(*names, action="append" if opt.kind == "append" else "store", **kw)


class MaskedFormatter(logging.Formatter):
    """Tracebacks (`--log-level debug`'s internal error, an unexpected error's
    log line) masked as credential errors are (redact.masked_lines): an
    exception's message, or one chained to it, may carry what a credential
    source said (a helper's stderr, with the keys it echoed).  Every message,
    lazyfs's and a library's alike, with any URL's password masked
    (redact.urls): an endpoint may carry one, and botocore's words quote it."""

    @staticmethod
    def message(record: logging.LogRecord) -> str:
        return redact.urls(record.getMessage())

    def formatException(self, ei: Any) -> str:
        return redact.masked_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return redact.masked_lines(super().formatStack(stack_info))


class JsonFormatter(MaskedFormatter):
    """One JSON object per line: time, level, logger, message, and the
    structured fields some lines carry (key, bytes, seconds, mbps, source)."""

    FIELDS = ("event", "key", "bytes", "seconds", "mbps", "source")

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname.lower(), "logger": record.name, "message": self.message(record)}
        for name in self.FIELDS:
            if hasattr(record, name):
                out[name] = redact.urls_in(getattr(record, name))
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


class OneLineFormatter(MaskedFormatter):
    """Each message on one line, whatever it holds.  Keys and paths are quoted
    where lazyfs logs them (wording.quoted); this catches what else a message
    carries (a library's exception text).  A traceback stays as Python prints it."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        shown = logging.makeLogRecord(record.__dict__)
        shown.message = one_line(redact.urls(record.message))
        return super().formatMessage(shown)


_LIBRARIES = ("botocore", "boto3", "urllib3", "s3transfer", "awscrt")


class LibraryTracebacks(logging.Filter):
    """A library's line that carries its exception's traceback (botocore's
    "Refreshing temporary credentials failed during mandatory refresh
    period", every request while a credential source fails) keeps its message
    and the exception's one line, not the traceback: what failed is lazyfs's
    own line to tell (a WARNING or ERROR naming the file and the cause), and
    a log must never fill with tracebacks of expected failures."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.split(".", 1)[0] in _LIBRARIES:
            exc = record.exc_info[1]
            if exc is not None:
                record.msg = f"{redact.masked(record.getMessage())} ({type(exc).__name__}: {redact.said(exc)})"
                record.args = None
            record.exc_info = record.exc_text = None
        return True


class RefreshWarnings(logging.Filter):
    """botocore's WARNING at each failed credential refresh ("Refreshing
    temporary credentials failed during mandatory refresh period": 1-3 a
    failed read) is DEBUG: the read it fails says so in lazyfs's one
    WARNING line, with the cause; an advisory refresh that failed changes
    nothing yet.  On the `botocore.credentials` logger, before its level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith("Refreshing temporary credentials"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(LibraryTracebacks())
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # botocore's debug output carries request headers; keep it out of our logs.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    refreshes = logging.getLogger("botocore.credentials")
    if not any(isinstance(f, RefreshWarnings) for f in refreshes.filters):
        refreshes.addFilter(RefreshWarnings())


def _values(args: argparse.Namespace) -> dict[str, Any]:
    """The command's options, checked (config.ConfigError on a bad value)."""
    return options.parse_options(COMMANDS[args.command][0], vars(args))


def _cmd_mount(args: argparse.Namespace) -> int:
    from lazyfs.startup import FirstListing

    cfg = mount_config(_values(args), os.environ)
    # The client and the first listing first: their round trips overlap the
    # import of pyfuse3, trio and the engine (startup.py).
    first = FirstListing(cfg)
    from lazyfs import mount  # imports pyfuse3: only for the commands that mount

    return mount.run(cfg, first)


def _cmd_bake(args: argparse.Namespace) -> int:
    from lazyfs import bake

    return bake.run(bake_config(_values(args), os.environ))


def _cmd_status(args: argparse.Namespace) -> int:
    from lazyfs import status

    return status.run(status_config(_values(args), os.environ))


def _cmd_lock(args: argparse.Namespace) -> int:
    from lazyfs import lockcmd

    return lockcmd.run(lock_config(_values(args), os.environ))


def _cmd_diff(args: argparse.Namespace) -> int:
    from lazyfs import lockcmd

    return lockcmd.run_diff(diff_config(_values(args)))


def _cmd_doctor(args: argparse.Namespace) -> int:
    from lazyfs import doctor

    return doctor.run(doctor_config(_values(args), os.environ))


def _cmd_umount(args: argparse.Namespace) -> int:
    from lazyfs.mounttab import MountError, abort_and_detach, mount_at, unmount

    path = os.path.abspath(args.mountpoint)
    entry = mount_at(path)  # through a symlink to the mountpoint too
    if entry is None:
        raise MountError(f"{path} is not mounted")
    path = entry.mountpoint
    if not entry.fstype.startswith("fuse"):
        raise MountError(f"{path} is a {entry.fstype} mount, not lazyfs")
    if args.force:
        abort_and_detach(path)
        print(f"lazyfs: aborted the connection of {path} and unmounted it")
        return EXIT_OK
    unmount(path, lazy=args.lazy)
    print(f"lazyfs: unmounted {path}")
    return EXIT_OK


_HANDLERS = {"mount": _cmd_mount, "bake": _cmd_bake, "status": _cmd_status, "lock": _cmd_lock, "diff": _cmd_diff,
             "doctor": _cmd_doctor, "umount": _cmd_umount}


class _Stops:
    # Set by main from its argv, before anything else runs: what a stop signal means.
    clean = False


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM and SIGINT.  A mount (until mount.py's own signal task takes
    them over): before it is up there is nothing to clean up, so a container
    stop during start-up is still a clean exit, 0.  Any other command has not
    done its work: interrupt.stop raises errors.Interrupted (exit 128+signal),
    or stops the trio run it is in.  Neither is a KeyboardInterrupt: one could
    land inside an `exec()` of a string (a dataclass being created by an
    import, a lazy one included), which CPython 3.11 remembers as an
    unhandled interrupt even once caught: the process would then kill itself
    with SIGINT at exit, no message, instead of exiting with its code."""
    if _Stops.clean:
        raise SystemExit(EXIT_OK)
    interrupt.stop(signum)


def main(argv: Sequence[str] | None = None) -> int:
    # A mount's start-up makes ~80,000 objects that live as long as it does
    # (modules, botocore's models); the cyclic collector would walk them
    # again and again as they are made: 30-40 ms of the ready line.  It stays
    # off until the mount is ready (mount._announce), and comes back on at
    # once for every other command (_run).
    gc.disable()
    argv = sys.argv[1:] if argv is None else argv
    _Stops.clean = bool(argv) and argv[0] == "mount"  # the command comes first (only --version may precede)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        return _run(argv)
    finally:
        interrupt.ignore_stops()
        gc.enable()


def _run(argv: Sequence[str]) -> int:
    command = ""
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        if command != "mount":
            gc.enable()
            not_a_daemon()  # a descriptor refused is this process's limit, not a daemon's
        setup_logging(args.log_level or "info", args.log_format or "text")
        code = int(_HANDLERS[command](args))
        sys.stdout.flush()  # here, not at exit: a reader gone is told apart below
        return code
    except Interrupted as e:
        interrupt.ignore_stops()  # a second signal while this one is told changes nothing
        _say(f"lazyfs: {command + ' ' if command else ''}interrupted by {e.signal_name}"
             + (f"; {e.unfinished}" if e.unfinished else ""))
        return e.exit_code
    except ConfigError as e:
        _say(f"lazyfs: error: {one_line(str(e))}")
        return EXIT_USAGE
    except LazyfsError as e:
        lack = e.errno if e.errno in DESCRIPTOR_ERRNOS else 0  # (its line names the limit: what to do, too)
        _say(f"lazyfs: error: {one_line(str(e))}" + (f"; {remedy(lack)}" if lack else ""))
        return EXIT_RUNTIME
    except Exception as e:  # a bug: say so in one line, keep the traceback for debug logs
        if _reader_left(e):
            return EXIT_OUTPUT_CLOSED
        if thread_limit(e):  # not a bug: a limit of the deployment's (README, "Threads")
            _say(f"lazyfs: error: cannot start a thread ({e}): the process is at its limit of threads or processes "
                 "(its cgroup's pids.max, ulimit -u)")
            return EXIT_RUNTIME
        if lack := descriptor_errno(e):  # not a bug either: the limit, said as a store's or a listing's line says it
            _say(f"lazyfs: error: cannot {command or 'start'}: {descriptors(lack)}; {remedy(lack)}")
            return EXIT_RUNTIME
        log.debug("internal error", exc_info=True)
        _say(f"lazyfs: internal error: {type(e).__name__}: {redact.masked(one_line(str(e)))} (rerun with "
             "--log-level debug for details)")
        return EXIT_RUNTIME


def _say(line: str) -> None:
    """The exit line, on stderr; any URL's password masked (redact.urls): whatever an error quotes (an
    endpoint, botocore's words) leaves the process only so."""
    print(redact.urls(line), file=sys.stderr)


def _reader_left(e: Exception) -> bool:
    """Did `e` come of writing to a stdout whose reader is gone (`lazyfs
    status | head`)?  Then there is nothing to say and no one to say it to:
    stdout is pointed at /dev/null, so that the interpreter's last flush of
    what is still buffered does not fail again, as the Python documentation
    advises for SIGPIPE.  A broken pipe anywhere else stays an internal
    error."""
    if not _broken_pipe(e) or not _stdout_closed():
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return True


def _broken_pipe(e: BaseException) -> bool:
    if isinstance(e, BrokenPipeError):
        return True
    inner = getattr(e, "exceptions", None)  # an ExceptionGroup (a trio nursery's: bake's progress lines)
    return isinstance(inner, tuple) and any(_broken_pipe(x) for x in inner)


def _stdout_closed() -> bool:
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), 0)  # POLLERR and POLLHUP are always reported
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in p.poll(0))
    except (OSError, ValueError):  # no descriptor (stdout replaced or closed)
        return False
