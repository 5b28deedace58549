"""The bench's model checkpoint (scripts/benchmark/checkpoint.py) is valid
safetensors, laid out as the serializer lays it out, and deterministic; checked
without torch, which only the bench extra installs."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

from awscrt import checksums

from benchmark import checkpoint as ckpt
from benchmark.data import Profile

TINY = ckpt.ModelShape(hidden=64, intermediate=128, vocab=256, layers=3, kv_dim=16, shards=2)


def _generate(tmp_path: Path, monkeypatch) -> ckpt.Checkpoint:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(ckpt.SHAPES, "tiny", TINY)
    profile = Profile("tiny", big_mib=1, shard_mib=1, shards=1, small_files=0, small_dirs=1, small_kib=1)
    return ckpt.ensure_checkpoint(profile, tmp_path, lambda msg: None)


def test_shards_are_valid_safetensors_in_serializer_order(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ck = _generate(tmp_path, monkeypatch)
    assert len(ck.shards) == 2 and len(ck.crcs) == 3 + 9 * TINY.layers
    seen = set()
    for shard in ck.shards:
        raw = (ck.root / shard).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__")
        spans = sorted((v["data_offsets"], name) for name, v in header.items())
        assert spans[0][0][0] == 0 and spans[-1][0][1] == len(raw) - 8 - n  # no gap at either end
        assert all(a[0][1] == b[0][0] for a, b in itertools.pairwise(spans))  # nor between tensors
        order = [name for _, name in spans]
        assert order == sorted(order, key=lambda t: (header[t]["dtype"] != "BF16", t))  # BF16 first, then F16
        for (start, end), name in spans:
            data = raw[8 + n + start:8 + n + end]
            assert checksums.crc64nvme(data) == ck.crcs[name]
            assert ck.weight_map[name] == shard
            seen.add(name)
    assert seen == set(ck.crcs)
    index = json.loads((ck.root / ckpt.INDEX).read_text())
    assert index["weight_map"] == ck.weight_map


def test_generation_is_deterministic_and_cached(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    a = _generate(tmp_path / "a", monkeypatch)
    b = _generate(tmp_path / "b", monkeypatch)
    assert a.files == b.files and a.crcs == b.crcs
    stamps = {p: p.stat().st_mtime_ns for p in a.root.iterdir()}
    again = _generate(tmp_path / "a", monkeypatch)
    assert again.files == a.files and again.crcs == a.crcs
    assert {p: p.stat().st_mtime_ns for p in a.root.iterdir()} == stamps  # found on disk, not written again
