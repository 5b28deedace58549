"""The benchmark's dataset: generated deterministically, cached on disk, and
uploaded once to the server.

Layout under the key root `<profile>/` (each mount serves one folder of it):

    models/model.safetensors                   the big file (1 GiB; --quick 256 MiB)
    models/model-0000N-of-00004.safetensors    four shards (256 MiB; --quick 64 MiB)
    many/dNNN/fNNNNN.bin                       small files (10,000 x 4 KiB in 100 folders)

Model files are valid safetensors (one F16 tensor filling the file, the header
padded with spaces as the format allows) whose bytes are pseudo-random from a
generator seeded by the file's path, so the same sizes give the same bytes on
every machine.  A manifest (size and SHA-256 of every file) sits beside the
local copy and, once every object is uploaded, in the bucket as
`_manifests/<profile>.json`: a rerun that finds an equal manifest there
uploads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

MiB = 1 << 20
DATASET_VERSION = 1
_CHUNK = 4 * MiB  # a multiple of 4, so chunked randbytes() is one stream


@dataclass(frozen=True)
class Profile:
    name: str
    big_mib: int
    shard_mib: int
    shards: int
    small_files: int
    small_dirs: int
    small_kib: int


PROFILES = {
    "default": Profile("default", big_mib=1024, shard_mib=256, shards=4, small_files=10_000, small_dirs=100,
                       small_kib=4),
    "quick": Profile("quick", big_mib=256, shard_mib=64, shards=4, small_files=1_000, small_dirs=10, small_kib=4),
}


@dataclass
class Dataset:
    profile: Profile
    root: Path  # the local copy: root/<rel> for every file
    files: dict[str, tuple[int, str]]  # rel -> (size, sha256)

    BIG = "models/model.safetensors"

    @property
    def big(self) -> str:
        return self.BIG

    @property
    def shards(self) -> list[str]:
        n = self.profile.shards
        return [f"models/model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    @property
    def small(self) -> list[str]:
        return sorted(rel for rel in self.files if rel.startswith("many/"))

    def size(self, rel: str) -> int:
        return self.files[rel][0]

    def key(self, rel: str) -> str:
        """The object key of a dataset file."""
        return f"{self.profile.name}/{rel}"

    def local(self, rel: str) -> Path:
        return self.root / rel

    def manifest(self) -> dict[str, Any]:
        return {"version": DATASET_VERSION, "profile": asdict(self.profile),
                "files": {rel: list(v) for rel, v in sorted(self.files.items())}}


def layout(p: Profile) -> list[tuple[str, int]]:
    files = [(Dataset.BIG, p.big_mib * MiB)]
    files += [(f"models/model-{i + 1:05d}-of-{p.shards:05d}.safetensors", p.shard_mib * MiB) for i in range(p.shards)]
    dirs = max(1, p.small_dirs)
    files += [(f"many/d{i % dirs:03d}/f{i:05d}.bin", p.small_kib * 1024) for i in range(p.small_files)]
    return files


def seed_of(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(f"lazyfs-bench/{DATASET_VERSION}/{rel}".encode()).digest()[:8], "little")


def safetensors_header(size: int) -> bytes:
    """The header (with its 8-byte length) of a safetensors file of exactly
    `size` bytes holding one F16 tensor, padded with spaces to 8-byte alignment."""
    space = 256
    while True:
        n = (size - 8 - space) // 2
        meta = json.dumps({"__metadata__": {"format": "pt", "generator": "lazyfs bench"},
                           "weight": {"dtype": "F16", "shape": [n], "data_offsets": [0, 2 * n]}},
                          separators=(",", ":")).encode()
        header_len = size - 8 - 2 * n
        if len(meta) <= header_len:
            return struct.pack("<Q", header_len) + meta + b" " * (header_len - len(meta))
        space *= 2


def write_file(path: Path, rel: str, size: int) -> str:
    """Write one file; its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    rnd = random.Random(seed_of(rel))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        head = safetensors_header(size) if rel.endswith(".safetensors") else b""
        f.write(head)
        digest.update(head)
        left = size - len(head)
        while left > 0:
            data = rnd.randbytes(min(_CHUNK, left))
            f.write(data)
            digest.update(data)
            left -= len(data)
    os.replace(tmp, path)
    return digest.hexdigest()


def ensure_local(p: Profile, data_home: Path, log: Callable[[str], None]) -> Dataset:
    """The local copy of the dataset, generated unless a matching manifest says it is there."""
    root = data_home / p.name
    mpath = root / "manifest.json"
    try:
        man = json.loads(mpath.read_text())
        if man.get("version") == DATASET_VERSION and man.get("profile") == asdict(p):
            files = {rel: (int(v[0]), str(v[1])) for rel, v in man["files"].items()}
            if all((root / rel).is_file() and (root / rel).stat().st_size == v[0] for rel, v in files.items()):
                return Dataset(p, root, files)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log(f"generating the {p.name} dataset in {root}")
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.monotonic()
    files = {rel: (size, write_file(root / rel, rel, size)) for rel, size in layout(p)}
    ds = Dataset(p, root, files)
    mpath.write_text(json.dumps(ds.manifest(), indent=0))
    log(f"generated {len(files)} files, {sum(s for s, _ in files.values()) / MiB:,.0f} MiB, "
        f"in {time.monotonic() - t0:.0f} s")
    return ds


def manifest_key(p: Profile) -> str:
    return f"_manifests/{p.name}.json"


def object_checksums(objects: dict[str, Path], algorithm: str, cache: Path) -> dict[str, list[str]]:
    """{key: [algorithm, base64 value]} of each local file, as S3 would keep
    it (the full-object CRC); remembered in `cache` by size and mtime."""
    import base64

    from awscrt import checksums  # lazyfs's own dependency

    crc, width = getattr(checksums, algorithm.lower()), 8 if algorithm == "CRC64NVME" else 4
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    out, fresh = {}, {}
    for key, path in objects.items():
        st = path.stat()
        stamp = f"{algorithm}:{st.st_size}:{st.st_mtime_ns}"
        if known.get(key, [None])[0] != stamp:
            value = 0
            with open(path, "rb") as f:
                while block := f.read(8 * MiB):
                    value = crc(block, value)
            known[key] = [stamp, base64.b64encode(value.to_bytes(width, "big")).decode()]
        fresh[key] = known[key]
        out[key] = [algorithm, known[key][1]]
    cache.write_text(json.dumps(fresh))
    return out


def upload_args(checksum: str) -> dict[str, str]:
    """A PUT's extra arguments: the additional checksum to send ("" for none),
    which a store may keep (real S3, SeaweedFS) or ignore (s3rver)."""
    return {"ChecksumAlgorithm": checksum} if checksum else {}


def ensure_uploaded(ds: Dataset, client: Any, bucket: str, log: Callable[[str], None], checksum: str = "") -> bool:
    """Upload every file unless the bucket's manifest already equals ours; True if it uploaded."""
    # The checksum is part of what is compared: objects uploaded without it are uploaded again.
    want = json.dumps({**ds.manifest(), **({"upload_checksum": checksum} if checksum else {})},
                      sort_keys=True).encode()
    try:
        if client.get_object(Bucket=bucket, Key=manifest_key(ds.profile))["Body"].read() == want:
            return False
    except Exception:  # missing or unreadable: upload
        pass
    log(f"uploading the {ds.profile.name} dataset to s3://{bucket}/{ds.profile.name}/ (one PUT per object)")
    t0 = time.monotonic()

    def put(rel: str) -> None:
        with open(ds.local(rel), "rb") as f:
            client.put_object(Bucket=bucket, Key=ds.key(rel), Body=f, **upload_args(checksum))

    big = [rel for rel, (size, _) in ds.files.items() if size > 8 * MiB]
    small = [rel for rel in ds.files if rel not in big]
    for rel in big:  # one at a time: a single PUT of 1 GiB is streamed from disk
        put(rel)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, small))
    # Last, so that its presence means every object is there.
    client.put_object(Bucket=bucket, Key=manifest_key(ds.profile), Body=want)
    log(f"uploaded {len(ds.files)} objects in {time.monotonic() - t0:.0f} s")
    return True
