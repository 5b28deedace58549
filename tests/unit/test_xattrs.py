"""Unit tests: a file's user.lazyfs.* attributes, read as getfattr -d reads
them (a listing, then each attribute in turn), agree with each other."""

from __future__ import annotations

import trio

from lazyfs.filestate import FileState, LocalState
from lazyfs.namespace import RemoteObject
from lazyfs.xattrs import READING_S, Readings

OBJ = RemoteObject("bkt", "m/w.bin", 10, "e" * 32, 1)
DOWNLOADING = LocalState(FileState.DOWNLOADING, "store", 10)
CACHED = LocalState(FileState.CACHED, "store", 10, verified="CRC32")


class Publishing:
    """The file's state as the store tells it: published after the first look."""

    def __init__(self) -> None:
        self.looks = 0
        self.now = 100.0

    async def look(self, obj: RemoteObject) -> LocalState:
        self.looks += 1
        return DOWNLOADING if self.looks == 1 else CACHED


def test_attributes_read_after_a_listing_all_answer_from_one_look() -> None:
    """getfattr -d read `state: downloading` and then, the download published
    meanwhile, `verified: CRC32`: two answers that never held at once."""
    file = Publishing()
    readings = Readings(file.look, clock=lambda: file.now)

    async def getfattr_d() -> list[LocalState]:
        readings.listed(7, OBJ)
        return [await readings.state(7, OBJ) for _name in ("fetched_bytes", "state", "verified")]

    assert trio.run(getfattr_d) == [DOWNLOADING] * 3
    file.now += 0.01
    assert trio.run(getfattr_d) == [CACHED] * 3, "the next listing looks again"


def test_a_read_without_a_listing_or_after_the_reading_looks_afresh() -> None:
    file = Publishing()
    readings = Readings(file.look, clock=lambda: file.now)

    async def read() -> LocalState:
        return await readings.state(7, OBJ)

    assert [trio.run(read), trio.run(read)] == [DOWNLOADING, CACHED]  # getfattr -n: each read is now
    file.looks = 0
    readings.listed(7, OBJ)
    assert trio.run(read) == DOWNLOADING
    file.now += READING_S + 0.1
    assert trio.run(read) == CACHED, "an answer is never more than READING_S late"
    other = RemoteObject("bkt", "m/other.bin", 10, "f" * 32, 1)
    file.looks = 0
    readings.listed(7, other)  # the inode number now names another file
    assert trio.run(read) == DOWNLOADING and file.looks == 1
