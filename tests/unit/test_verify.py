"""Hashing a file for verification (verify.py): the digest over pieces fed in
any split, and the cost per byte in memory faults."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Iterator

import pytest

from lazyfs import readback, verify
from lazyfs.errors import IntegrityError

SIZE = 3 * readback.CHUNK + 12345  # several buffers and a ragged end


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = os.urandom(SIZE)
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def test_md5_of_a_file_fed_in_uneven_steps(data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    exp = verify.Expectation("MD5", hashlib.md5(data).hexdigest())
    digest = verify.Digest(exp)
    for start, end in ((0, 1), (1, readback.CHUNK + 7), (readback.CHUNK + 7, SIZE - 3), (SIZE - 3, SIZE)):
        verify.feed(fd, start, end, digest)
    assert digest.fed == SIZE
    assert digest.value() == exp.value


def test_compute_and_check_agree_with_the_reference(data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    exp = verify.Expectation("CRC32", crc)
    assert verify.compute(fd, SIZE, exp) == crc
    verify.check(fd, SIZE, exp, "s3://b/blob")


def test_a_file_shorter_than_expected_is_an_integrity_error(data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    exp = verify.Expectation("MD5", hashlib.md5(data + b"x").hexdigest())
    with pytest.raises(IntegrityError):
        verify.check(fd, SIZE + 1, exp, "s3://b/blob")


HASH_64_MIB = """
import ctypes, hashlib, os, resource, sys
from lazyfs import mount, verify
mount.return_freed_buffers()  # the daemon's malloc setting: large buffers are mmapped
fd = os.open(sys.argv[1], os.O_RDONLY)
verify.compute(fd, 4 << 20, verify.Expectation("MD5", ""))  # the first buffer
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
verify.compute(fd, 64 << 20, verify.Expectation("MD5", ""))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_hashing_reuses_its_buffer_instead_of_faulting_in_fresh_memory(tmp_path: Path) -> None:
    """A new buffer per read costs a page fault and a zeroed page per 4 KiB
    hashed (16,384 for 64 MiB): measured as a sixth of the daemon's CPU on a
    cold model load.  The buffer is reused."""
    path = tmp_path / "blob"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    out = subprocess.run([sys.executable, "-c", HASH_64_MIB, str(path)], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(verify.__file__).parents[1]).stdout
    assert int(out) < 1000


def _composite_crc32(parts: list[bytes]) -> str:
    """S3's composite checksum: the CRC32 of the parts' big-endian CRC32s, and the count."""
    inner = b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts)
    return f"{base64.b64encode(zlib.crc32(inner).to_bytes(4, 'big')).decode()}-{len(parts)}"


def test_a_composite_checksum_is_recomputed_part_by_part(data_file: tuple[int, bytes]) -> None:
    """boto3's default multipart upload carries a composite CRC32: checked
    with the confirmed part sizes, in any split of the feeding."""
    fd, data = data_file
    sizes = (readback.CHUNK + 1, readback.CHUNK + 1, SIZE - 2 * (readback.CHUNK + 1))
    parts = [data[:sizes[0]], data[sizes[0]:sizes[0] + sizes[1]], data[sizes[0] + sizes[1]:]]
    value = _composite_crc32(parts)
    exp = verify.Expectation("CRC32-composite", value, sizes)
    assert verify.compute(fd, SIZE, exp) == value
    digest = verify.Digest(exp)
    for start in range(0, SIZE, 777_777):
        verify.feed(fd, start, min(SIZE, start + 777_777), digest)
    assert digest.value() == value
    wrong = verify.Expectation("CRC32-composite", value, (sizes[0] - 1, sizes[1] + 1, sizes[2]))
    with pytest.raises(IntegrityError):
        verify.check(fd, SIZE, wrong, "s3://b/k")


def test_a_composite_checksum_goes_before_the_multipart_etag_but_not_into_locks() -> None:
    part = verify.Part(size=5 * 1024 * 1024, count=3)
    size = 2 * part.size + 100
    etag = "0" * 32 + "-3"
    chosen = verify.choose(etag, ("CRC32", "AAAAAA==-3", "COMPOSITE"), True, size, lambda n: part)
    assert chosen is not None and chosen.algorithm == "CRC32-composite"
    assert chosen.part_sizes == (part.size, part.size, 100) and not chosen.exact
    for_lock = verify.choose(etag, ("CRC32", "AAAAAA==-3", "COMPOSITE"), True, size, lambda n: part, composite=False)
    assert for_lock is not None and for_lock.algorithm == "MD5-multipart"
    # A composite value sent bare (moto) says no part count: the ETag decides.
    bare = verify.choose(etag, ("CRC32", "AAAAAA==", "COMPOSITE"), True, size, lambda n: part)
    assert bare is not None and bare.algorithm == "MD5-multipart"


def test_a_store_that_cannot_say_its_parts_is_checked_against_a_common_uploaders_part_size() -> None:
    """Ceph RGW ignores partNumber: a download is checked against the first
    common part size that makes the ETag's number of parts (boto3's 8 MiB
    before rclone's 5 MiB); a lock never records a guess."""
    MiB = 1024 * 1024
    cannot_say = lambda n: verify.Part(20 * MiB, 0)  # noqa: E731  (the whole object's length, no count)
    etag = "0" * 32 + "-3"
    guessed = verify.choose(etag, None, True, 20 * MiB, cannot_say, guess=True)
    assert guessed is not None and guessed.part_sizes == (8 * MiB, 8 * MiB, 4 * MiB) and not guessed.exact
    assert verify.choose(etag, None, True, 20 * MiB, cannot_say) is None
    assert verify.guessed_part_sizes(10 * MiB + 1, 3) == (5 * MiB, 5 * MiB, 1)
    assert verify.guessed_part_sizes(300 * MiB, 20) == (15 * MiB,) * 20  # s3cmd's
    assert verify.guessed_part_sizes(3 * MiB, 3) is None  # no common uploader cuts 3 MiB in 3
    assert verify.guessed_part_sizes(8 * MiB, 1) is None  # one part is not a multipart upload
    big = 200_000 * MiB  # boto3 doubles 8 MiB until there are at most 10,000 parts: 32 MiB
    assert verify.guessed_part_sizes(big, 6250) == (32 * MiB,) * 6250


def test_a_one_part_upload_is_checked_by_its_etag_without_asking_for_its_part() -> None:
    """ETag "...-1": the one part is the whole object, so its size is known
    where the store cannot say it (Ceph RGW), for a download and a lock alike."""
    asked: list[int] = []

    def cannot_say(n: int) -> verify.Part:
        asked.append(n)
        return verify.Part(3000, 0)

    for guess in (True, False):
        chosen = verify.choose("0" * 32 + "-1", None, True, 3000, cannot_say, guess=guess)
        assert chosen is not None and chosen.algorithm == "MD5-multipart"
        assert chosen.part_sizes == (3000,) and chosen.exact
    composite = verify.choose("0" * 32 + "-1", ("CRC32", "AAAAAA==-1", "COMPOSITE"), True, 3000, cannot_say)
    assert composite is not None and composite.algorithm == "CRC32-composite" and composite.part_sizes == (3000,)
    assert not asked
