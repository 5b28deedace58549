"""Checking downloaded bytes against what the object store vouches for.

In order of preference:
  1. the object's additional checksum over the full object (CRC32, SHA1,
     SHA256 always; CRC32C and CRC64NVME when `awscrt` is installed);
  2. a single-part ETag, which is the MD5 of the content;
  3. a composite checksum of a multipart upload ("<checksum of the parts'
     checksums>-<parts>": what boto3 and the AWS CLI send by default, CRC32),
     or else a multipart ETag ("<md5 of part md5s>-<parts>"), each recomputed
     part by part (a CRC costs a fraction of an MD5) from part sizes the store
     confirmed (a single part is the whole object: nothing to ask): it must
     report the same number of parts as the ETag (HEAD
     ?partNumber=1 answers x-amz-mp-parts-count); every part but the last is
     taken to have part 1's size (what every common uploader does), and when
     that does not match, each part's size is asked for; a store that cannot
     say (Ceph RGW ignores partNumber) has a download checked against the
     part size of the first common uploader that makes the ETag's number of
     parts (COMMON_PART_SIZES; never in a lock);
  4. nothing but the size, when none of those applies (SSE-KMS and SSE-C
     ETags are not MD5s; a multipart upload of another part size on a store
     that cannot say its parts: a download of one is made twice and the two
     compared first, completion.check).  Such a file is published *unverified*,
     never called corrupt without evidence.

Blocking: reads the whole file.  Run in a worker thread.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from lazyfs import readback
from lazyfs.errors import IntegrityError

_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART = re.compile(r"^([0-9a-f]{32})-(\d+)$")
_COMPOSITE = re.compile(r"^[A-Za-z0-9+/]+={0,2}-(\d+)$")
# Expectation.algorithm of a composite checksum: "<checksum>-composite".
COMPOSITE_SUFFIX = "-composite"


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the bytes must hash to.  `value` is base64 for checksums and hex
    for ETags; `part_sizes` are set for multipart ETags, and `exact` says
    whether each was confirmed (else all but the last were assumed equal to
    part 1)."""

    algorithm: str
    value: str
    part_sizes: tuple[int, ...] = ()
    exact: bool = True

    def describe(self) -> str:
        return f"{self.algorithm} {self.value}"

    @property
    def per_part(self) -> bool:
        """Hashed part by part (a multipart ETag, a composite checksum)."""
        return self.algorithm == "MD5-multipart" or self.algorithm.endswith(COMPOSITE_SUFFIX)


@dataclass(frozen=True, slots=True)
class Part:
    """What the store says of one part of a multipart object."""

    size: int
    count: int  # parts the store reports the object has (0: it did not say)


# part number -> what the store says of it (None: it cannot say)
PartLookup = Callable[[int], "Part | None"]
# Parts of an object asked for one by one at most (each is a request).
MAX_PARTS_ASKED = 1000
_MiB = 1024 * 1024
# Part sizes of the common uploaders, most common first: boto3, the AWS CLI
# and the CRT (8 MiB, doubled by boto3 for objects of over 10,000 parts),
# rclone and the Go SDK (5 MiB), MinIO's clients (16 MiB), s5cmd (50 MiB),
# s3cmd (15 MiB).  Tried, the first that makes the ETag's number of parts,
# when the store cannot say where the parts are (one hash: a wrong guess
# only leaves the file unverified).
COMMON_PART_SIZES = tuple(n * _MiB for n in (8, 5, 16, 50, 15, 32, 64, 128, 256, 512, 1024))


def _crt(name: str) -> Callable[[bytes, int], int] | None:
    try:
        from awscrt import checksums  # optional: botocore[crt]
    except ImportError:
        return None
    return getattr(checksums, name, None)


class CrcHasher:
    """CRC-style running checksum presented like a hashlib object."""

    def __init__(self, fn: Callable[[bytes, int], int], width: int) -> None:
        self._fn, self._width, self.value = fn, width, 0

    def update(self, data: Any) -> None:
        self.value = self._fn(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(self._width, "big")


def _hasher(algorithm: str) -> Any | None:
    if algorithm == "CRC32":
        fn = _crt("crc32")
        return CrcHasher(fn if fn else (zlib.crc32), 4)
    if algorithm == "CRC32C":
        fn = _crt("crc32c")
        return CrcHasher(fn, 4) if fn else None
    if algorithm == "CRC64NVME":
        fn = _crt("crc64nvme")
        return CrcHasher(fn, 8) if fn else None
    if algorithm in ("SHA1", "SHA256"):
        return hashlib.new(algorithm.lower())
    return None


def _hasher_for(exp: Expectation) -> Any:
    """A fresh hasher of the algorithm `exp` is made of (MD5 for a multipart
    ETag, the CRC or SHA of a composite checksum); ValueError if there is none."""
    base = "MD5" if exp.algorithm == "MD5-multipart" else exp.algorithm.removesuffix(COMPOSITE_SUFFIX)
    h = hashlib.md5() if base == "MD5" else _hasher(base)
    if h is None:
        raise ValueError(f"cannot compute {exp.algorithm}")
    return h


def can_compute(algorithm: str) -> bool:
    return _hasher(algorithm.removesuffix(COMPOSITE_SUFFIX)) is not None


def choose(etag: str, checksum: tuple[str, str, str] | None, etag_is_md5: bool, size: int,
           part: PartLookup, composite: bool = True, guess: bool = False) -> Expectation | None:
    """The strongest check available, or None (the file will be unverified).
    `checksum` is (algorithm, value, kind); `etag_is_md5` is False for
    SSE-KMS/SSE-C objects; `part` is asked only for multipart objects (a
    request); `composite=False` passes over composite checksums; `guess`
    tries a common uploader's part size when the store cannot say them (a
    download's check, where a wrong guess leaves the file unverified, never
    a lock, which records sizes as the store's)."""
    if checksum is not None:
        algorithm, value, kind = checksum
        if kind == "FULL_OBJECT" and can_compute(algorithm):
            return Expectation(algorithm, value)
        m = _COMPOSITE.match(value)
        if composite and kind == "COMPOSITE" and m and can_compute(algorithm):
            parts = _parts(algorithm + COMPOSITE_SUFFIX, value, int(m.group(1)), size, part, guess)
            if parts is not None:
                return parts
    if not etag_is_md5:
        return None
    if _MD5_HEX.match(etag):
        return Expectation("MD5", etag)
    m = _MULTIPART.match(etag)
    return _parts("MD5-multipart", etag, int(m.group(2)), size, part, guess) if m else None


def _parts(algorithm: str, value: str, count: int, size: int, part: PartLookup,
           guess: bool) -> Expectation | None:
    if count == 1:
        # One part is the whole object: its size is known without asking (a
        # store that ignores partNumber cannot tell it, and need not).
        return Expectation(algorithm, value, (size,))
    sizes = assumed_part_sizes(size, count, part)
    if sizes is not None:
        # One or two parts are fully determined by part 1 and the size.
        return Expectation(algorithm, value, sizes, exact=len(sizes) <= 2)
    sizes = exact_part_sizes(size, count, part)
    if sizes is not None:
        return Expectation(algorithm, value, sizes)
    sizes = guessed_part_sizes(size, count) if guess else None
    return Expectation(algorithm, value, sizes, exact=False) if sizes is not None else None


def guessed_part_sizes(size: int, count: int) -> tuple[int, ...] | None:
    """Part sizes for the first of COMMON_PART_SIZES that cuts `size` bytes
    into `count` parts.  An ETag (or composite) that matches them says the
    bytes are the ones uploaded as surely as sizes the store told; one that
    does not says nothing (another uploader's sizes)."""
    for each in COMMON_PART_SIZES:
        if count > 1 and each * (count - 1) < size <= each * count:
            return (each,) * (count - 1) + (size - each * (count - 1),)
    return None


def assumed_part_sizes(size: int, count: int, part: PartLookup) -> tuple[int, ...] | None:
    """Part sizes from part 1's, when the store confirms the parts count and
    the object's size allows every part but the last to be part 1's size."""
    first = part(1)
    if first is None or first.count != count or first.size <= 0:
        return None
    if count == 1:
        return (size,) if first.size == size else None
    last = size - first.size * (count - 1)
    if not 0 < last <= first.size:
        return None
    return (first.size,) * (count - 1) + (last,)


def exact_part_sizes(size: int, count: int, part: PartLookup) -> tuple[int, ...] | None:
    """Every part's size as the store reports it, or None if it cannot say
    (or there are too many parts to ask for)."""
    if count > MAX_PARTS_ASKED:
        return None
    sizes = []
    for number in range(1, count + 1):
        info = part(number)
        if info is None or info.count != count or info.size <= 0:
            return None
        sizes.append(info.size)
    return tuple(sizes) if sum(sizes) == size else None


class Digest:
    """The digest of a file in an Expectation's form, fed its bytes in order
    (as they arrive, or from the file): one hash per part for a multipart
    ETag or a composite checksum, one hash otherwise."""

    def __init__(self, exp: Expectation) -> None:
        self.exp = exp
        self.fed = 0
        self._parts = list(exp.part_sizes) if exp.per_part else []
        self._part_left = self._parts[0] if self._parts else 0
        self._part_digests: list[bytes] = []
        self._h: Any = self._new()

    def _new(self) -> Any:
        return _hasher_for(self.exp)

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self.fed += len(view)
        if not self._parts:
            self._h.update(view)
            return
        while view:
            take = min(len(view), self._part_left)
            self._h.update(view[:take])
            view = view[take:]
            self._part_left -= take
            if self._part_left == 0 and len(self._part_digests) < len(self._parts) - 1:
                self._next_part()

    def _next_part(self) -> None:
        self._part_digests.append(self._h.digest())
        self._h = self._new()
        self._part_left = self._parts[len(self._part_digests)]

    def value(self) -> str:
        """The digest of everything fed, in the Expectation's form."""
        if self.exp.algorithm == "MD5":
            return str(self._h.hexdigest())
        if not self.exp.per_part:
            return base64.b64encode(self._h.digest()).decode()
        return composite_value(self.exp, [*self._part_digests, self._h.digest()])

    def result(self) -> Hashed:
        return Hashed(self.exp, self.fed, self.value())


@dataclass(frozen=True, slots=True)
class Hashed:
    """What a file's first `size` bytes hash to in `exp`'s form, worked out
    while it downloaded (a running Digest, or piecesums.PieceSums)."""

    exp: Expectation
    size: int
    value: str


def part_ranges(exp: Expectation) -> list[tuple[int, int]]:
    """The byte range [start, end) of each part of a per-part Expectation."""
    ranges, start = [], 0
    for size in exp.part_sizes:
        ranges.append((start, start + size))
        start += size
    return ranges


def part_digest(fd: int, start: int, end: int, exp: Expectation, cancelled: Callable[[], bool]) -> bytes:
    """The binary digest of one part, bytes [start, end) of the file, in the
    algorithm `exp` hashes its parts with (blocking: reads them back)."""
    h = _hasher_for(exp)
    readback.read_into(fd, start, end, h, cancelled)
    return bytes(h.digest())


def composite_value(exp: Expectation, digests: list[bytes]) -> str:
    """A multipart ETag's or composite checksum's value from its parts' binary digests."""
    whole = _hasher_for(exp)  # a checksum of the parts' checksums, in order
    whole.update(b"".join(digests))
    if exp.algorithm == "MD5-multipart":
        return f"{whole.hexdigest()}-{len(digests)}"
    return f"{base64.b64encode(whole.digest()).decode()}-{len(digests)}"


def feed(fd: int, start: int, end: int, digest: Digest, cancelled: Callable[[], bool] = lambda: False) -> None:
    """Feed bytes [start, end) of the file to `digest` (which has had [0, start))."""
    assert digest.fed == start, "a digest must be fed in order"
    readback.read_into(fd, start, end, digest, cancelled)


def compute(fd: int, size: int, exp: Expectation, cancelled: Callable[[], bool] = lambda: False) -> str:
    """The digest of the file's first `size` bytes, in `exp`'s form."""
    digest = Digest(exp)
    readback.read_into(fd, 0, size, digest, cancelled)
    return digest.value()


def check(fd: int, size: int, exp: Expectation, uri: str,  # (as a log line shows it: wording.quoted)
          cancelled: Callable[[], bool] = lambda: False) -> None:
    got = compute(fd, size, exp, cancelled)
    if got != exp.value:
        raise mismatch(exp, got, uri)


def mismatch(exp: Expectation, got: str, uri: str) -> IntegrityError:
    """The error for bytes that hash to `got`, not to `exp`."""
    return IntegrityError(f"{uri}: downloaded bytes do not match the object's "
                          f"{exp.algorithm} (expected {exp.value}, got {got})")
