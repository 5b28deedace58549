"""Loader order and next shards (modelaware.py), and which opens wait for a
whole shard (handles.Handles._opens_whole), as pure functions."""

from __future__ import annotations

import itertools
import json
import struct
from types import SimpleNamespace

import pytest

from lazyfs import modelaware
from lazyfs.handles import Handles
from lazyfs.namespace import RemoteObject


def safetensors(tensors: dict[str, tuple[str, int]]) -> tuple[bytes, int]:
    """A header laying out tensors in the given (file) order; the file's size."""
    meta, pos = {}, 0
    for name, (dtype, nbytes) in tensors.items():
        meta[name] = {"dtype": dtype, "shape": [nbytes // 2], "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(meta).encode()
    raw += b" " * (-len(raw) % 8)
    header = struct.pack("<Q", len(raw)) + raw
    return header, len(header) + pos


def test_the_order_follows_tensor_names_not_the_file() -> None:
    block = 1  # a block per byte: every tensor's bytes are its own
    # File order: F32 first (alignment), then BF16; names interleave.
    header, size = safetensors({"a.norm": ("F32", 300), "c.norm": ("F32", 300),
                                "b.weight": ("BF16", 500), "d.weight": ("BF16", 500)})
    order = modelaware.loader_order(header, size, block)
    assert order is not None and sorted(order) == list(range(-(-size // block)))
    h = len(header)

    at = {b: i for i, b in enumerate(order)}
    spans = {"a": (0, 300), "b": (600, 1100), "c": (300, 600), "d": (1100, 1600)}
    positions = [[at[h + byte] for byte in range(*spans[t])] for t in "abcd"]
    assert all(max(p) < min(q) for p, q in itertools.pairwise(positions)), \
        "tensors a, b, c, d are not fetched in that order"
    assert order[0] == 0, "the header comes first"


def test_not_a_safetensors_header_gives_no_order() -> None:
    assert modelaware.header_size(b"\xff" * 8) is None
    assert modelaware.loader_order(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{not json}      ", 100, 10) is None
    header, size = safetensors({"x": ("BF16", 10)})
    assert modelaware.loader_order(header, size - 5, 10) is None, "offsets beyond the file"


def framed(raw: bytes) -> bytes:
    """`raw` as a safetensors header: its length, then it, padded to 8 bytes."""
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("raw", [
    b"[" * 1500 + b"]" * 1500,  # nested deeper than json recurses: RecursionError
    b'{"x": ' * 1500 + b"1" + b"}" * 1500,
    b'{"x": {"data_offsets": [0, 1e400]}}',  # int(inf): OverflowError
    b'{"x": {"data_offsets": [0, -1e400]}}',
], ids=["arrays", "objects", "infinite-offset", "minus-infinite-offset"])
def test_a_header_no_writer_makes_gives_no_order_and_raises_nothing(raw: bytes) -> None:
    header = framed(raw)
    assert modelaware.loader_order(header, len(header) + 64, 16) is None


def test_next_shard() -> None:
    names = ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
             "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    assert modelaware.next_shard("m/v1/model-00001-of-00003.safetensors", names) == \
        "m/v1/model-00002-of-00003.safetensors"
    assert modelaware.next_shard("m/v1/model-00003-of-00003.safetensors", names) is None
    assert modelaware.next_shard("m/v1/model.safetensors", names) is None


def test_an_index_names_the_shards_of_its_own_checkpoint() -> None:
    names = ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "consolidated-00001-of-00001.safetensors", "model.safetensors", "model-00001-of-00002.bin"]
    assert modelaware.is_index("model.safetensors.index.json")
    assert not modelaware.is_index(".safetensors.index.json") and not modelaware.is_index("model.safetensors")
    assert modelaware.index_shards("model.safetensors.index.json", names) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert modelaware.index_shards("other.safetensors.index.json", names) == []


def test_a_models_config_brings_the_folders_small_files() -> None:
    files = {"config.json": 500, "tokenizer.json": 9_000_000, "generation_config.json": 44,
             "model.safetensors.index.json": 30_000, "model-00001-of-00002.safetensors": 5 << 30,
             "model-00002-of-00002.safetensors": 3 << 30, "merges.txt": 400_000, "tokenizer.model": 500_000,
             "chat_template.jinja": 3_000, "modeling_x.py": 40_000,
             # weights a safetensors loader never reads, even small ones; and a file too big
             "pytorch_model.bin": 40_000_000, "tf_model.h5": 40_000_000, "model.onnx": 1_000,
             "README.md": 5_000, "huge.json": modelaware.COMPANION_MAX_BYTES + 1}
    assert modelaware.companions("m/v3/config.json", files) == [
        "m/v3/chat_template.jinja", "m/v3/generation_config.json", "m/v3/merges.txt",
        "m/v3/model.safetensors.index.json", "m/v3/modeling_x.py", "m/v3/tokenizer.json", "m/v3/tokenizer.model"]
    assert modelaware.companions("config.json", {"config.json": 5, "a.safetensors": 9, "b.txt": 1}) == ["b.txt"]
    # Only a config opens the way, and only in a folder that holds a model.
    assert modelaware.companions("m/v3/tokenizer.json", files) == []
    assert modelaware.companions("app/config.json", {"config.json": 5, "logo.png": 100}) == []
    many = {f"f{i:03d}.json": 10 for i in range(100)} | {"config.json": 5, "w.safetensors": 10}
    got = modelaware.companions("config.json", many)
    assert len(got) == modelaware.COMPANIONS and got[0] == "f000.json"


def test_only_a_config_in_a_folder_of_model_size_is_looked_at() -> None:
    assert modelaware.may_have_companions("config.json", 12)
    assert not modelaware.may_have_companions("tokenizer.json", 12)
    assert not modelaware.may_have_companions("config.json", modelaware.COMPANION_FOLDER_MAX + 1)


@pytest.mark.parametrize("mode, walked, direct, budget, waits", [
    ("checkpoint", True, False, None, True),    # a loader mapping a shard of the checkpoint it walks
    ("checkpoint", True, True, None, False),    # the Run:ai streamer: O_DIRECT, large parallel reads
    ("checkpoint", False, False, None, False),  # a reader of a lone file gets its first bytes at once
    ("always", False, True, None, True),
    ("never", True, False, None, False),
    ("checkpoint", True, False, 1 << 30, True),
    ("always", True, False, (1 << 30) - 1, False),  # not kept: no copy once it is whole (it was downloaded twice)
])
def test_which_opens_wait_for_the_whole_file(mode: str, walked: bool, direct: bool, budget: int | None,
                                             waits: bool) -> None:
    fits = None if budget is None else SimpleNamespace(fits=lambda obj: obj.size <= budget)
    handles = Handles(SimpleNamespace(cfg=SimpleNamespace(whole_file_open=mode), budget=fits))  # type: ignore[arg-type]
    handles.passes_through = lambda: True
    shard = RemoteObject("b", "m/model-00001-of-00002.safetensors", 1 << 30, "e", 0)
    if walked:
        handles._walked[shard.version] = True
    assert handles._opens_whole(shard, direct) is waits
