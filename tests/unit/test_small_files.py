"""Unit tests: the store's small files (saved listings, atomic small writes)
and who a transfer's failure is blamed on."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from lazyfs import crt, layer, listings, ranged_get
from lazyfs.errors import RemoteUnavailable, StoreError
from lazyfs.layer import write_small
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import ResponseMeta
from lazyfs.ranged_get import RangeJob, _read, fetch_range_blocking
from lazyfs.store import Store
from lazyfs.storewrite import PieceWriter, WriteTurns

OBJ = RemoteObject("bkt", "m/w.bin", 10, "e" * 32, 1)


def test_a_saved_listing_reads_back_whole_and_is_encoded_in_short_batches(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One json.dumps holds the GIL for all it encodes (110 ms at 200,000
    rows, the trio thread stalled meanwhile): rows go in batches."""
    objects = [RemoteObject("bkt", f"m/ü/{i:06d}\"q", i, f"{i:032x}", i * 10**9)
               for i in range(2 * listings.ROWS_PER_DUMP + 5)]
    longest: list[int] = []
    real_dumps = json.dumps

    def dumps(value: Any, **kwargs: Any) -> str:
        if isinstance(value, list):
            longest.append(len(value))
        return real_dumps(value, **kwargs)

    monkeypatch.setattr(listings.json, "dumps", dumps)
    (tmp_path / "store").mkdir()
    s = Store.open(str(tmp_path / "store"))
    try:
        s.listings.save("bkt", "m/", objects)
        s.listings.save("bkt", "empty/", [])
        assert s.listings.load("bkt", "m/") == objects
        assert s.listings.load("bkt", "empty/") == []
    finally:
        s.close()
    assert longest and max(longest) <= listings.ROWS_PER_DUMP


def test_a_small_write_on_a_full_disk_leaves_no_temporary_file(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "old").write_bytes(b"old")

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(layer.os, "write", full)
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as e:
            write_small(dfd, "old", b"new contents")
    finally:
        os.close(dfd)
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old").read_bytes() == b"old"


class Broken:
    meta = ResponseMeta(etag_is_md5=True, checksum=None)

    def read(self, n: int) -> bytes:
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    def close(self) -> None:
        pass


def test_a_socket_error_of_the_body_is_the_networks_fault_not_the_stores() -> None:
    """An OSError from the HTTP body is a transfer that broke off (retried;
    EIO if it keeps failing), never a store error with the socket's errno."""
    with pytest.raises(RemoteUnavailable) as e:
        _read(Broken(), OBJ, 10)
    assert not isinstance(e.value, StoreError) and "transfer broke off" in str(e.value)


def test_a_write_error_is_the_stores_with_its_errno(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT, 0o600)  # not open for writing: EBADF
    try:
        with pytest.raises(StoreError) as e:
            PieceWriter(fd, OBJ, direct=lambda: False, turns=WriteTurns()).write(b"data", 0)
    finally:
        os.close(fd)
    assert e.value.errno == errno.EBADF and "cannot write it to the store" in str(e.value)


class BreaksOnce:
    """A remote whose first body breaks off after 4 bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.calls = data, 0

    def get_range(self, obj: RemoteObject, start: int, end: int) -> Any:
        self.calls += 1
        body, broken = self.data[start:end], self.calls == 1

        class Body:
            meta = ResponseMeta(etag_is_md5=True, checksum=None)
            sent = 0

            def read(self, n: int) -> bytes:
                if broken and self.sent >= 4:
                    raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
                piece = body[self.sent:self.sent + (min(n, 4) if broken else n)]
                self.sent += len(piece)
                return piece

            def close(self) -> None:
                pass

        return Body()


def test_a_retry_names_the_object_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """The cause's message starts with the object's URI already: the retry
    line said "s3://bkt/m/w.bin: s3://bkt/m/w.bin: transfer broke off..."."""
    monkeypatch.setattr(ranged_get.time, "sleep", lambda s: None)
    remote = BreaksOnce(b"0123456789")
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    job = RangeJob(OBJ, fd, WriteTurns(), 0, 10, 10, attempts=3, cancelled=lambda: False,
                   posted=lambda n: None, got_meta=lambda meta: None)
    try:
        with caplog.at_level(logging.INFO, logger="lazyfs.ranged_get"):
            fetch_range_blocking(remote, job)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789"
    [line] = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert line.startswith(f'"{OBJ.uri}": transfer broke off') and line.count(OBJ.uri) == 1, line
    assert "retrying bytes 4-9" in line and "(attempt 2 of 3)" in line


class SocketClosed(Exception):
    name = "AWS_IO_SOCKET_CLOSED"


def test_the_crt_client_never_says_a_broken_transfer_got_bytes_it_cannot_count(tmp_path: Path) -> None:
    """awscrt hands over a part only once all of it has arrived: a reset
    after 1000 bytes of a part said "transfer broke off after 0 bytes" (the
    request's first offset).  What was written is counted from the request's
    own first byte; bytes of a part never handed over are not counted."""
    obj = RemoteObject("bkt", "m/w.bin", 3 * 65536, "e" * 32, 1)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        job = RangeJob(obj, fd, WriteTurns(), 65536, 2 * 65536, 65536, attempts=3, cancelled=lambda: False,
                       posted=lambda n: None, got_meta=lambda meta: None)
        writer = PieceWriter(fd, obj, direct=lambda: False, turns=WriteTurns())
        state = crt._Received(job, writer, 65536, whole=False, etag_is_md5=True)
        client = crt.CrtTransfer.__new__(crt.CrtTransfer)  # _translate needs nothing the client holds
        nothing = str(client._translate(SocketClosed(), obj, state))
        state.on_body(b"x" * 1000, 65536)
        some = str(client._translate(SocketClosed(), obj, state))
    finally:
        os.close(fd)
    assert nothing == (f'"{obj.uri}": transfer broke off before any of bytes 65536-131071 was written '
                       "(AWS_IO_SOCKET_CLOSED)")
    assert some == f'"{obj.uri}": transfer broke off with 1000 of bytes 65536-131071 written (AWS_IO_SOCKET_CLOSED)'
