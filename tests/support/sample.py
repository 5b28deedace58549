"""A small generated model: a safetensors checkpoint with a real header, a
config and a tokenizer, deterministic for a given size."""

from __future__ import annotations

import json
import random
import struct
from typing import Any


def safetensors_bytes(size: int, seed: int = 0) -> bytes:
    """A valid safetensors file of exactly `size` bytes: one F16 tensor filling
    it, the header padded with spaces (which the format allows)."""
    n = max(0, (size - 200) // 2)
    while True:
        header = json.dumps({"weight": {"dtype": "F16", "shape": [n], "data_offsets": [0, 2 * n]},
                             "__metadata__": {"format": "pt"}}).encode()
        free = size - 8 - len(header) - 2 * n
        if free >= 0 or n == 0:
            break
        n = max(0, n - (-free + 1) // 2)
    if free < 0:  # too small for a header: just bytes
        return random.Random(seed).randbytes(size)
    header += b" " * free
    return struct.pack("<Q", len(header)) + header + random.Random(seed).randbytes(2 * n)


def sample_model(model_mib: int = 32) -> dict[str, bytes]:
    """Relative path -> bytes for a small LLM-like folder."""
    vocab: dict[str, Any] = {f"tok{i}": i for i in range(4000)}
    return {
        "config.json": json.dumps({"architectures": ["TinyLM"], "hidden_size": 256,
                                   "num_hidden_layers": 2, "vocab_size": len(vocab)}, indent=2).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": vocab}}).encode(),
        "model.safetensors": safetensors_bytes(model_mib * 1024 * 1024, seed=1),
    }
