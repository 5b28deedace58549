"""`.lazyfs/states.json` called through the operations (no kernel): every
file's state in one read, as each file's attributes say it, in chunks of store
looks that fail alone (a row without a state) or, when the store stops
answering, with EIO, as a getxattr does."""

from __future__ import annotations

import errno
import json
import os
import threading
from typing import Any

import pyfuse3
import pytest
from test_operations import CTX, ops_for, walk

from lazyfs import statesfile
from lazyfs.fetch import Fetcher
from lazyfs.store import Store
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote

N = 2 * statesfile.CHUNK + 7  # more than one store hop


async def read_states(ops: Any) -> dict[str, Any]:
    attrs = await walk(ops, ".lazyfs", "states.json")
    info = await ops.open(attrs.st_ino, os.O_RDONLY, CTX)
    try:
        body = b""
        while chunk := bytes(await ops.read(info.fh, len(body), 1 << 20)):
            body += chunk
    finally:
        await ops.release(info.fh)
    return json.loads(body)


@trio_test
async def test_the_states_file_answers_what_each_files_attributes_answer(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(N):
        remote.put(BUCKET, f"m/d{i % 3}/f{i:04d}.bin", bytes([i % 256]) * (i + 1))
    real = Store.local_state

    def refused(self: Store, obj: Any, checked: Any = None) -> Any:
        if obj.key == "m/d1/f0004.bin":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self, obj, checked)

    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        cached = await walk(ops, "m", "d0", "f0003.bin")
        info = await ops.open(cached.st_ino, os.O_RDONLY, CTX)
        await ops.read(info.fh, 0, 4)
        await ops.release(info.fh)
        obj = ops.catalog.tree.find("m/d0/f0003.bin")
        await wait_for(lambda: fetcher.active(obj) is None, "publication")  # type: ignore[arg-type]
        monkeypatch.setattr(Store, "local_state", refused)
        got = await read_states(ops)
        assert got["listed"] is True and len(got["files"]) == N
        rows = {key: (size, state, verified) for key, size, state, verified in got["files"]}
        assert rows.pop("m/d1/f0004.bin") == (5, None, "Permission denied"), "refused: no state, and why"
        [line] = [r.getMessage() for r in caplog.records if r.name == "lazyfs.statesfile"]
        assert line == 'states.json: the state of 1 file could not be read from the store ("m/d1/f0004.bin": ' \
                       'Permission denied)'
        for key, (size, state, verified) in rows.items():
            ino = (await walk(ops, *key.split("/"))).st_ino
            assert (state, verified) == ((await ops.getxattr(ino, b"user.lazyfs.state", CTX)).decode(),
                                         (await ops.getxattr(ino, b"user.lazyfs.verified", CTX)).decode()), key
            assert size == int(key[-8:-4]) + 1
        assert rows["m/d0/f0003.bin"][1] == "cached" and sum(r[1] == "missing" for r in rows.values()) == N - 2
        assert remote.count("GET") == 1, "judging the files downloaded something"


@trio_test
async def test_a_store_that_stops_answering_makes_the_states_file_eio_not_a_hang(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statesfile, "STATE_WAIT_S", 0.5)
    remote.put(BUCKET, "m/a.bin", b"a")
    stuck = threading.Event()
    monkeypatch.setattr(Store, "local_state", lambda self, obj, checked=None: stuck.wait(30))
    fetcher = Fetcher(remote, stores(), fetch_config())
    try:
        async with running(fetcher):
            ops = await ops_for(remote, fetcher)
            for _ in range(2):  # the second waits for the thread the first left in the store: EIO too
                with pytest.raises(pyfuse3.FUSEError) as info:
                    await read_states(ops)
                assert info.value.errno == errno.EIO
    finally:
        stuck.set()


async def looked_up_and_read(ops: Any) -> tuple[int, int, bytes]:
    """states.json as `cp` or a map takes it: the size its lookup says, the
    size the fstat after its open says, and the bytes read."""
    attrs = await walk(ops, ".lazyfs", "states.json")
    info = await ops.open(attrs.st_ino, os.O_RDONLY, CTX)
    try:
        fstat = await ops.getattr(attrs.st_ino, CTX)
        body = b""
        while chunk := bytes(await ops.read(info.fh, len(body), 1 << 20)):
            body += chunk
    finally:
        await ops.release(info.fh)
    return attrs.st_size, fstat.st_size, body


@trio_test
async def test_the_states_file_shows_the_size_of_what_its_open_reads(remote: FakeRemote, stores) -> None:
    """It showed size 0: readers sized by stat (cp's sendfile, mmap, head -c)
    got nothing.  A lookup takes the snapshot the open after it reads; a
    later lookup a new one (never a stale document)."""
    for i in range(30):
        remote.put(BUCKET, f"m/f{i:02d}.bin", bytes([i]) * (i + 1))
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        looked, fstat, body = await looked_up_and_read(ops)
        assert looked == fstat == len(body) and len(json.loads(body)["files"]) == 30
        ino = (await walk(ops, "m", "f07.bin")).st_ino
        info = await ops.open(ino, os.O_RDONLY, CTX)
        await ops.read(info.fh, 0, 8)
        await ops.release(info.fh)
        obj = ops.catalog.tree.find("m/f07.bin")
        await wait_for(lambda: fetcher.active(obj) is None, "publication")  # type: ignore[arg-type]
        looked, fstat, now = await looked_up_and_read(ops)
        assert looked == fstat == len(now) != len(body)
        assert [r[2] for r in json.loads(now)["files"] if r[0] == "m/f07.bin"] == ["cached"]
        assert remote.count("GET") == 1, "judging the files downloaded something"
