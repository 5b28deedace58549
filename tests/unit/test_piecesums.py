"""Verification by the CRCs of pieces taken as they were written (piecesums.py):
the combined value is the file's, whatever the pieces' sizes and order, and
only what no sum covers is read back."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterator

import pytest

from lazyfs import piecesums, verify
from lazyfs.namespace import RemoteObject
from lazyfs.piecesums import CELL, PieceSums
from lazyfs.stats import STATS
from lazyfs.storewrite import PieceWriter, WriteTurns

pytest.importorskip("awscrt.checksums")
MiB = 1024 * 1024
SIZE = 21 * MiB + 12345  # ragged: the last cell is short


@pytest.fixture
def store_file(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


def expectation(algorithm: str, data: bytes, parts: tuple[int, ...] = ()) -> verify.Expectation:
    """What the store would report for `data`, computed by verify's own reference hashing."""
    if not parts:
        digest = verify.Digest(verify.Expectation(algorithm, ""))
    else:
        digest = verify.Digest(verify.Expectation(algorithm + verify.COMPOSITE_SUFFIX, "", parts))
    digest.update(data)
    return verify.Expectation(digest.exp.algorithm, digest.value(), parts)


def pieces(size: int, rng: random.Random, start: int = 0) -> list[tuple[int, int]]:
    """Bytes [start, size) cut into requests of 0.5-9 MiB, each arriving in pieces of 1 B to 600 KiB."""
    out, pos = [], start
    while pos < size:
        end = min(size, pos + rng.randrange(MiB // 2, 9 * MiB))
        while pos < end:
            n = min(end - pos, rng.choice((1, 4096, 65536, 256 * 1024, 600 * 1024, rng.randrange(1, 700_000))))
            out.append((pos, n))
            pos += n
    return out


def write(fd: int, sums: PieceSums, data: bytes, todo: list[tuple[int, int]]) -> None:
    turns = WriteTurns()
    with PieceWriter(fd, RemoteObject("bkt", "m/x.bin", len(data), "e" * 32, 1), lambda: False, turns, sums) as writer:
        for offset, n in todo:
            writer.write(data[offset:offset + n], offset)


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "CRC64NVME"])
@pytest.mark.parametrize("parts", [(), (8 * MiB, 8 * MiB, 5 * MiB + 12345), (5 * MiB,) * 4 + (MiB + 12345,)],
                         ids=["full-object", "8MiB-parts", "5MiB-parts"])
def test_sums_of_pieces_in_any_order_make_the_file_checksum_without_reading_it(
        store_file: int, algorithm: str, parts: tuple[int, ...]) -> None:
    rng = random.Random(f"{algorithm}{parts}")
    data = rng.randbytes(SIZE)
    todo = pieces(SIZE, rng)
    rng.shuffle(todo)  # requests in parallel: pieces land in any order
    sums = PieceSums(SIZE, algorithm)
    write(store_file, sums, data, todo)
    exp = expectation(algorithm, data, parts)
    before = STATS.verify_read_bytes
    hashed = sums.hashed(store_file, exp)
    assert hashed is not None and hashed.value == exp.value and hashed.size == SIZE
    assert STATS.verify_read_bytes == before, "bytes were read back although every piece was summed"


def test_what_no_sum_covers_is_read_back_and_only_that(store_file: int) -> None:
    """Pieces from before the algorithm was known, blocks found on disk by a
    resume, and a part boundary inside a MiB."""
    rng = random.Random(7)
    data = rng.randbytes(SIZE)
    os.pwrite(store_file, data[:3 * MiB + 100], 0)  # on disk already, never summed
    sums = PieceSums(SIZE, "CRC64NVME")
    write(store_file, sums, data, pieces(SIZE, rng, start=3 * MiB + 100))
    before = STATS.verify_read_bytes
    hashed = sums.hashed(store_file, expectation("CRC64NVME", data))
    assert hashed is not None and hashed.value == expectation("CRC64NVME", data).value
    assert STATS.verify_read_bytes - before == 3 * MiB + 100
    # Parts of 3 MiB + 7: each boundary inside a cell costs that cell's bytes read back, no more.
    odd = (3 * MiB + 7,) * 7
    odd = (*odd[:-1], SIZE - sum(odd[:-1]))
    before = STATS.verify_read_bytes
    hashed = sums.hashed(store_file, expectation("CRC64NVME", data, odd))
    assert hashed is not None and hashed.value == expectation("CRC64NVME", data, odd).value
    assert 0 < STATS.verify_read_bytes - before - (3 * MiB + 100) <= 6 * CELL


def test_a_range_written_again_is_summed_as_it_is_on_disk(store_file: int) -> None:
    """A store that ignores If-Match can send another version's bytes for a
    range fetched again: the sums must never vouch for bytes overwritten since."""
    rng = random.Random(3)
    data, other = rng.randbytes(SIZE), rng.randbytes(SIZE)
    sums = PieceSums(SIZE, "CRC32C")
    write(store_file, sums, data, pieces(SIZE, rng))
    # Overlapping rewrites that start elsewhere than the sums they cut into.
    write(store_file, sums, other, [(2 * MiB + 5000, 70_000), (5 * MiB - 100, 300), (9 * MiB, MiB + 1)])
    on_disk = os.pread(store_file, SIZE, 0)
    assert on_disk != data
    hashed = sums.hashed(store_file, expectation("CRC32C", data))
    assert hashed is not None and hashed.value == expectation("CRC32C", on_disk).value
    assert hashed.value != expectation("CRC32C", data).value


def test_another_algorithm_starts_afresh_and_no_algorithm_sums_nothing(store_file: int) -> None:
    rng = random.Random(5)
    data = rng.randbytes(SIZE)
    sums = PieceSums(SIZE, "CRC32")
    write(store_file, sums, data, [(0, 4 * MiB)])
    assert sums.start("CRC64NVME") and sums.algorithm == "CRC64NVME"
    write(store_file, sums, data, [(4 * MiB, SIZE - 4 * MiB)])
    before = STATS.verify_read_bytes
    hashed = sums.hashed(store_file, expectation("CRC64NVME", data))
    assert hashed is not None and hashed.value == expectation("CRC64NVME", data).value
    assert STATS.verify_read_bytes - before == 4 * MiB, "the CRC32 sums were used for a CRC64NVME"
    assert sums.hashed(store_file, expectation("CRC32", data)) is None  # not what it summed
    assert not sums.start("") and sums.summed(0, b"x") is None  # an MD5 file: nothing summed
    assert piecesums.algorithm_of(verify.Expectation("MD5-multipart", "x-2", (1, 1))) == ""
    assert piecesums.algorithm_of(verify.Expectation("CRC32C-composite", "x-2", (1, 1))) == "CRC32C"


def test_a_huge_file_costs_a_few_bytes_per_mib() -> None:
    """Sums are kept per MiB in an array, not as Python objects: the memory bound holds for 1 TiB."""
    sums = PieceSums(1 << 40, "CRC64NVME")
    assert len(sums._cell_crc) * sums._cell_crc.itemsize + len(sums._whole) <= 9 * (1 << 20)
