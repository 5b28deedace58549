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

from lazyfs import verify
from lazyfs.errors import IntegrityError

SIZE = 3 * verify._READ + 12345  # several buffers and a ragged end


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
    for start, end in ((0, 1), (1, verify._READ + 7), (verify._READ + 7, SIZE - 3), (SIZE - 3, SIZE)):
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
