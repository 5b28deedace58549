"""A GET that cannot open a socket for want of a descriptor says so (exhausted.py).

Under `prlimit --nofile=64:64` a tester's daemon logged each such GET as
`EndpointConnectionError: Could not connect to the endpoint URL: ...;
retrying the GET`: an operator looked at the network.  botocore wraps the
OSError (EMFILE) its connection met; the retry line and the failure name the
daemon's descriptor limit instead, and a reader gets EMFILE, as the README's
failure table says for an open that needs a descriptor and gets none.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import urllib3.util.connection

from lazyfs import crt, exhausted
from lazyfs.config import RemoteConfig
from lazyfs.errors import RemoteUnavailable, errno_of
from lazyfs.namespace import RemoteObject
from lazyfs.ranged_get import RangeJob
from lazyfs.remote import Remote
from lazyfs.storewrite import PieceWriter, WriteTurns

OBJ = RemoteObject("bkt", "m/d3/f125.bin", 10, "e" * 32, 1)
SAID = "too many open files: the daemon's descriptor limit (ulimit -n / RLIMIT_NOFILE) is "


def test_a_get_with_no_descriptor_for_its_socket_names_the_limit(static_keys: None, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    def no_descriptor(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")  # socket.socket(), as under prlimit --nofile=64:64

    monkeypatch.setattr(urllib3.util.connection, "create_connection", no_descriptor)
    remote = Remote(RemoteConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1", max_attempts=2,
                                 connect_timeout=1.0, read_timeout=1.0))
    caplog.set_level(logging.INFO, logger="lazyfs")
    with pytest.raises(RemoteUnavailable) as info:
        remote.get_range(OBJ, 0, OBJ.size)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    failure = str(info.value)
    assert failure.startswith(f'"{OBJ.uri}": cannot open a connection to the object store: {SAID}{limit}'), failure
    assert errno_of(info.value) == errno.EMFILE  # what the README's failure table says a reader gets
    [retry] = [r.getMessage() for r in caplog.records if "retrying the GET" in r.getMessage()]
    assert retry.startswith(f'"{OBJ.uri}": cannot open a connection to the object store: {SAID}{limit}'), retry
    assert "EndpointConnectionError" not in retry + failure and "\n" not in retry + failure


def test_the_system_s_limit_is_told_from_the_daemon_s() -> None:
    from lazyfs.exhausted import descriptor_errno, descriptors

    wrapped = RuntimeError("Could not connect")
    wrapped.kwargs = {"error": OSError(errno.ENFILE, "Too many open files in system")}  # type: ignore[attr-defined]
    assert descriptor_errno(wrapped) == errno.ENFILE
    assert "fs.file-max" in descriptors(errno.ENFILE)
    assert descriptor_errno(OSError(errno.ECONNREFUSED, "Connection refused")) == 0


class MaxFds(Exception):
    """What awscrt raises for a connection whose socket() failed with EMFILE (awscrt 0.38)."""

    name = "AWS_ERROR_MAX_FDS_EXCEEDED"


def test_the_crt_client_names_the_limit_too(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        job = RangeJob(OBJ, fd, WriteTurns(), 0, OBJ.size, 65536, attempts=3, cancelled=lambda: False,
                       posted=lambda n: None, got_meta=lambda meta: None)
        writer = PieceWriter(fd, OBJ, direct=lambda: False, turns=WriteTurns())
        state = crt._Received(job, writer, 0, whole=True, etag_is_md5=True)
        client = crt.CrtTransfer.__new__(crt.CrtTransfer)  # _translate needs nothing the client holds
        error = client._translate(MaxFds(), OBJ, state)
    finally:
        os.close(fd)
    assert str(error).startswith(f'"{OBJ.uri}": cannot open a connection to the object store: {SAID}'), str(error)
    assert errno_of(error) == errno.EMFILE
    assert state.transient()  # tried again, as a refused connection is (a descriptor may be free by then)


def test_a_store_side_os_error_for_want_of_a_descriptor_names_the_limit() -> None:
    """The store's opens (a download's lock, sparse file, resume record, a
    copy's descriptor) logged the bare strerror, "Too many open files": whose
    files, and what limit?  They name it as a GET's does."""
    from lazyfs.exhausted import strerror

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert strerror(OSError(errno.EMFILE, "Too many open files")).startswith(f"{SAID}{limit}")
    assert "fs.file-max" in strerror(OSError(errno.ENFILE, "Too many open files in system"))
    assert strerror(OSError(errno.EACCES, "Permission denied", "x")) == "Permission denied"  # others as they were


def test_a_request_failing_with_a_bare_emfile_names_the_limit_in_its_line(caplog: pytest.LogCaptureFixture) -> None:
    from lazyfs.repeats import RepeatedLines

    caplog.set_level(logging.INFO, logger="test.descriptors")
    lines = RepeatedLines()
    lines.failed(logging.getLogger("test.descriptors"), "read", OSError(errno.EMFILE, "Too many open files"),
                 errno.EMFILE)
    [line] = [r.getMessage() for r in caplog.records]
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert line.startswith(f"read: {SAID}{limit}") and line.endswith("(errno EMFILE)"), line


def test_a_first_listing_out_of_the_daemons_descriptors_ends_the_start_naming_the_limit() -> None:
    """EMFILE on the start-up listing was taken for an unreachable object
    store: an offline start, or "the store has nothing to serve" (its files
    could not be opened either).  The daemon's own limit does not pass: the
    start ends, the line naming the folder and the limit (cli adds what to
    do).  The system's table full (ENFILE) may pass: an offline start."""
    from lazyfs.errors import OutOfDescriptors
    from lazyfs.offlinestart import start_failure, starts_offline, until

    own = OutOfDescriptors('"s3://bkt/m/": cannot open a connection to the object store: ...', errno.EMFILE,
                           bucket="bkt", key="m/")
    system = OutOfDescriptors('"s3://bkt/m/": cannot open a connection to the object store: ...', errno.ENFILE,
                              bucket="bkt", key="m/")
    assert not starts_offline(own)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    failure = start_failure(own)
    assert str(failure).startswith(f'cannot list "s3://bkt/m/": {SAID}{limit}'), str(failure)
    assert errno_of(failure) == errno.EMFILE
    assert starts_offline(system)
    assert "descriptors to spare" in until(system) and "reachable" not in until(system)


def in_a_nursery(e: BaseException) -> BaseException:
    """`e` as a trio nursery raises it: in an exception group."""
    async def fail() -> None:
        raise e

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)

    try:
        trio.run(main)
    except BaseException as raised:
        return raised
    raise AssertionError("no exception")


@pytest.mark.parametrize("wrap", [lambda e: e, in_a_nursery], ids=["bare", "in a nursery's group"])
def test_a_command_out_of_descriptors_says_the_limit_and_the_fix_in_one_line(
        wrap: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A mount's start that ran out of descriptors where nothing named them
    (trio's wake-up socket pair, /dev/null for the page-cache reads) ended
    with `lazyfs: internal error: OSError: [Errno 24] Too many open files
    (rerun with --log-level debug for details)`, and the traceback at debug."""
    from lazyfs import cli

    def out_of_descriptors(args: object) -> int:
        raise wrap(OSError(errno.EMFILE, "Too many open files", "/dev/null"))

    monkeypatch.setitem(cli._HANDLERS, "doctor", out_of_descriptors)
    monkeypatch.setattr(cli, "setup_logging", lambda *args: None)  # (its handler would outlive capsys's stderr)
    assert cli._run(["doctor"]) == 1
    err = capsys.readouterr().err
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert err.startswith(f"lazyfs: error: cannot doctor: {SAID.replace('the daemon', 'this process')}{limit}"), err
    assert "raise it (ulimit -n" in err and err.count("\n") == 1 and "internal error" not in err, err


def test_an_error_whose_reason_is_a_string_is_no_descriptor_error_and_no_crash() -> None:
    # UnicodeDecodeError and ssl.SSLError carry `reason` as a string: followed as an
    # exception, it ended every command in an AttributeError (a credential_process
    # with non-UTF-8 stderr, a TLS certificate refused).
    decode = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    tls = ssl.SSLError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    tls.reason = "CERTIFICATE_VERIFY_FAILED"
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = tls
    assert exhausted.descriptor_errno(decode) == 0
    assert exhausted.descriptor_errno(wrapped) == 0


def test_a_mount_is_refused_below_what_one_reader_needs_and_gets_fewer_gets_above_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A limit just above what the start takes made a mount that said ready
    and failed every open with EMFILE (fdneeds.py): below what one reader
    with one GET needs the start ends naming both; above it, the GETs in
    flight are what the rest allows."""
    from lazyfs import fdneeds
    from lazyfs.config import FetchConfig, MountConfig, Source
    from lazyfs.mounttab import MountError

    cfg = MountConfig(mountpoint=tmp_path, sources=(Source("b", "m/"),), fetch=FetchConfig(max_connections=16))
    monkeypatch.setattr(fdneeds, "in_use", lambda: 13)
    least = fdneeds.needed(13 + 24)
    assert least == 13 + 24 + fdneeds.FUSE_SESSION + fdneeds.ONE_OPEN + fdneeds.PER_GET

    def limit(soft: int) -> None:
        monkeypatch.setattr(fdneeds.resource, "getrlimit", lambda which: (soft, soft))

    limit(least - 1)
    with pytest.raises(MountError) as info:
        fdneeds.fit_descriptors(cfg, client=24)
    assert errno_of(info.value) == errno.EMFILE  # cli adds the remedy
    said = str(info.value)
    assert said.startswith(f"cannot mount at {tmp_path}: {SAID}{least - 1}; a mount needs at least {least} "
                           "to serve a reader (37 in use or taken as it starts"), said
    caplog.set_level(logging.INFO, logger="lazyfs")
    limit(least)
    assert fdneeds.fit_descriptors(cfg, client=24).fetch.max_connections == 1
    limit(least + 2 * fdneeds.PER_GET + 1)
    assert fdneeds.fit_descriptors(cfg, client=24).fetch.max_connections == 3
    assert "allows 3 parallel GETs" in caplog.text
    limit(4096)
    assert fdneeds.fit_descriptors(cfg, client=24) is cfg  # plenty: as asked


@pytest.mark.parametrize("argv, whose", [
    (["status"], "this process's"), (["doctor"], "this process's"), (["lock"], "this process's"),
    (["bake"], "this process's"), (["mount", "/mnt/x"], "the daemon's"),
], ids=["status", "doctor", "lock", "bake", "mount"])
def test_a_command_out_of_descriptors_names_its_own_limit_not_a_daemons(
        argv: list[str], whose: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The last line of a command that ran out of descriptors where nothing
    said so (the fallback) named "the daemon's descriptor limit" for every
    command, though only a mount has a daemon."""
    from lazyfs import cli


    def out_of_descriptors(args: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setitem(cli._HANDLERS, argv[0], out_of_descriptors)
    monkeypatch.setattr(cli, "setup_logging", lambda *a: None)
    assert cli._run(argv) == 1
    line = capsys.readouterr().err
    assert line.startswith(f"lazyfs: error: cannot {argv[0]}: too many open files: {whose} descriptor limit "
                           "(ulimit -n / RLIMIT_NOFILE) is "), line
