"""Fetching a checkpoint in the order loaders read it.

safetensors loaders (`safetensors.torch.load_file`, vLLM, transformers) map
a shard and copy its tensors in the order of their *names*, while the file
lays them out by dtype alignment first, then name: with mixed dtypes the two
orders differ, and a sweep in file order makes the loader wait for each
tensor it jumps to.  So once a download has the file's header, it fetches the
blocks in the order of the tensor names (then anything not covered, in file
order).  And a sharded checkpoint's next shard (`...-00002-of-00004...`) is
started in the background once a reader has read most of one (and its last
requests are on the wire, so the two never compete while a reader waits for
the first; handles.Handles._read_through), so the loader finds it arriving.
And opening a model folder's `config.json` (what model servers read first)
fetches its other configs and its tokenizer at once: loaders read them next,
one at a time, a round trip each.  Opening a checkpoint's index (what
loaders read before the shards) marks its shards as ones a loader reads whole
(handles.Handles._opens_whole).

Pure functions: the engine calls them on the trio thread with bytes it has.
"""

from __future__ import annotations

import json
import re
import struct

# The largest header we read: safetensors itself refuses more than 100 MB.
MAX_HEADER = 100_000_000
# A model folder's companions, fetched when its config.json is opened: the
# kinds of file model servers read beside the weights (configs, tokenizers,
# chat templates, remote code), never weights of other formats a safetensors
# loader skips (pytorch_model.bin, tf_model.h5, .onnx), each of at most this
# size (tokenizers run to tens of MB), at most this many (the first by name),
# so app files beside a model cost a bounded number of requests.
COMPANION_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py", ".yaml", ".yml")
COMPANION_MAX_BYTES = 64 * 1024 * 1024
COMPANIONS = 32
# A folder of more entries is not a model's: no companions, and no walk of it
# on the trio thread at each open of a config.json.
COMPANION_FOLDER_MAX = 10_000
INDEX_SUFFIX = ".safetensors.index.json"
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<count>\d+)\.safetensors$")


def is_safetensors(key: str) -> bool:
    return key.endswith(".safetensors")


def header_size(first8: bytes) -> int | None:
    """Bytes of header (the 8-byte length and the JSON) a file starts with, or
    None when it is not a safetensors header."""
    if len(first8) < 8:
        return None
    (n,) = struct.unpack("<Q", first8[:8])
    return n + 8 if 0 < n <= MAX_HEADER else None


def loader_order(header: bytes, size: int, block_size: int) -> list[int] | None:
    """The blocks of the file in the order a loader reads them (the header,
    then each tensor by name, then what no tensor covers), or None when the
    header is not one safetensors writes."""
    total = header_size(header)
    if total is None or len(header) < total:
        return None
    try:
        meta = json.loads(header[8:total])
        spans = sorted((name, int(t["data_offsets"][0]), int(t["data_offsets"][1]))
                       for name, t in meta.items() if name != "__metadata__")
    # Whatever the bytes: JSON nested deeper than the parser recurses
    # (RecursionError), an offset of 1e400 (int(inf): OverflowError) and the
    # like are as much "not a header safetensors writes" as bad JSON is.
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
        return None
    nblocks = max(1, -(-size // block_size))
    order: list[int] = []
    seen = bytearray(nblocks)

    def add(start: int, end: int) -> None:
        for i in range(start // block_size, min(nblocks, -(-end // block_size))):
            if not seen[i]:
                seen[i] = 1
                order.append(i)

    add(0, total)
    for _, begin, end in spans:
        if not 0 <= begin <= end <= size - total:
            return None
        add(total + begin, total + end)
    add(0, size)  # anything the tensors left out (padding, trailing bytes)
    return order


def next_shard(key: str, siblings: list[str]) -> str | None:
    """The shard after `key` among the names in its folder (`model-00001-of-00004.safetensors`
    -> `model-00002-of-00004.safetensors`), if there is one."""
    folder, _, name = key.rpartition("/")
    m = _SHARD.match(name)
    if m is None:
        return None
    index, count = int(m.group("index")), int(m.group("count"))
    if index >= count:
        return None
    width = len(m.group("index"))
    want = f"{m.group('stem')}-{index + 1:0{width}d}-of-{m.group('count')}.safetensors"
    if want not in siblings:
        return None
    return f"{folder}/{want}" if folder else want


def is_index(name: str) -> bool:
    """Is this a sharded checkpoint's index (`model.safetensors.index.json`),
    which loaders read before its shards?"""
    return name.endswith(INDEX_SUFFIX) and len(name) > len(INDEX_SUFFIX)


def index_shards(index: str, siblings: list[str]) -> list[str]:
    """The shards of the checkpoint indexed by the file named `index`, among
    the names of its folder, in order: `model-0000N-of-0000M.safetensors`
    for `model.safetensors.index.json`.  Not read from the index's
    weight_map: that would wait for its bytes, and loaders name their
    shards so."""
    stem = index[:-len(INDEX_SUFFIX)]
    return sorted(n for n in siblings if (m := _SHARD.match(n)) is not None and m.group("stem") == stem)


def may_have_companions(name: str, entries: int) -> bool:
    """Is a file of this name, in a folder of this many entries, worth a look
    at the folder for companions?"""
    return name == "config.json" and entries <= COMPANION_FOLDER_MAX


def companions(key: str, files: dict[str, int]) -> list[str]:
    """When `key` is a model's `config.json` (its folder holds safetensors
    files), the keys of the folder's other small files that loaders read
    next (`files`: each file of the folder by name, with its size)."""
    folder, _, name = key.rpartition("/")
    if name != "config.json" or not any(is_safetensors(n) for n in files):
        return []
    small = sorted(n for n, size in files.items()
                   if n != name and n.endswith(COMPANION_SUFFIXES) and size <= COMPANION_MAX_BYTES)
    return [f"{folder}/{n}" if folder else n for n in small[:COMPANIONS]]
