"""The model-load scenario's checkpoint: a sharded safetensors model with the
files a model server reads beside it, generated deterministically, cached on
disk and uploaded once.

Layout under the key root `<profile>/checkpoint/` (and the local copy
`.bench/data/<profile>-checkpoint/`):

    config.json                          a Llama-style configuration
    tokenizer.json                       a byte-level BPE vocabulary of `vocab` tokens
    generation_config.json
    model.safetensors.index.json         weight_map: tensor name -> shard
    model-0000N-of-0000S.safetensors     the shards

The tensors are those of a small Llama-style decoder: embeddings and an output
head (vocab x hidden), per layer q/o projections (hidden x hidden), grouped k/v
projections (kv_dim x hidden), three MLP matrices (intermediate x hidden) and
two norms (hidden), and a final norm: 201 tensors and 2.05 GiB in the default
profile (`--quick`: 57 tensors, 254 MiB).  Weights are BF16; the norms and the
output head are F16, so both 2-byte types are exercised.  Tensors go to shards
in model order, cut at equal byte counts, the way `save_pretrained` shards;
within a shard the data is laid out as the safetensors serializer lays it out
(by dtype, then name), so a loader that walks tensors by name reads each dtype's
run front to back.  Every tensor's bytes are pseudo-random from a generator
seeded by its name, and its CRC64-NVME (awscrt, hardware-accelerated) is kept in
the manifest, so a loader can check each tensor it materialised in a fraction of
a second per GiB.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from awscrt import checksums

from benchmark.data import Profile, upload_args

MiB = 1 << 20
CHECKPOINT_VERSION = 1
FOLDER = "checkpoint"  # the key folder under <profile>/, and what lazyfs mounts
INDEX = "model.safetensors.index.json"
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", INDEX)
_CHUNK = 4 * MiB
# safetensors' serializer orders tensors by dtype (its enum order, descending), then by name.
_DTYPE_RANK = {"F16": 7, "BF16": 8, "F32": 11}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    kv_dim: int
    shards: int


# Dataset profile name -> the checkpoint measured with it.
SHAPES = {
    "default": ModelShape(hidden=2048, intermediate=5632, vocab=32000, layers=22, kv_dim=256, shards=4),
    "quick": ModelShape(hidden=1024, intermediate=2816, vocab=32000, layers=6, kv_dim=256, shards=2),
}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


def tensors(s: ModelShape) -> list[Tensor]:
    """Every tensor, in model order."""
    h, i = s.hidden, s.intermediate
    out = [Tensor("model.embed_tokens.weight", "BF16", (s.vocab, h))]
    for n in range(s.layers):
        p = f"model.layers.{n}."
        out += [Tensor(p + "input_layernorm.weight", "F16", (h,)),
                Tensor(p + "self_attn.q_proj.weight", "BF16", (h, h)),
                Tensor(p + "self_attn.k_proj.weight", "BF16", (s.kv_dim, h)),
                Tensor(p + "self_attn.v_proj.weight", "BF16", (s.kv_dim, h)),
                Tensor(p + "self_attn.o_proj.weight", "BF16", (h, h)),
                Tensor(p + "post_attention_layernorm.weight", "F16", (h,)),
                Tensor(p + "mlp.gate_proj.weight", "BF16", (i, h)),
                Tensor(p + "mlp.up_proj.weight", "BF16", (i, h)),
                Tensor(p + "mlp.down_proj.weight", "BF16", (h, i))]
    out += [Tensor("model.norm.weight", "F16", (h,)), Tensor("lm_head.weight", "F16", (s.vocab, h))]
    return out


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def assign_shards(ts: list[Tensor], n: int) -> dict[str, list[Tensor]]:
    """Model order, cut where the running byte count crosses k/n of the total."""
    total = sum(t.nbytes for t in ts)
    out: dict[str, list[Tensor]] = {shard_name(k, n): [] for k in range(n)}
    start = 0
    for t in ts:
        k = min(n - 1, start * n // total)
        out[shard_name(k, n)].append(t)
        start += t.nbytes
    return out


def file_order(ts: list[Tensor]) -> list[Tensor]:
    return sorted(ts, key=lambda t: (-_DTYPE_RANK[t.dtype], t.name))


def header(ts: list[Tensor]) -> bytes:
    """The length-prefixed JSON header, space-padded to 8-byte alignment."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": "lazyfs bench"}}
    off = 0
    for t in file_order(ts):
        meta[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"lazyfs-bench/ckpt/{CHECKPOINT_VERSION}/{name}".encode()).digest()[:8],
                          "little")


def write_shard(path: Path, ts: list[Tensor]) -> tuple[str, dict[str, int]]:
    """Write one shard; its SHA-256 and each tensor's CRC64-NVME."""
    digest = hashlib.sha256()
    crcs: dict[str, int] = {}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        head = header(ts)
        f.write(head)
        digest.update(head)
        for t in file_order(ts):
            rnd = random.Random(tensor_seed(t.name))
            crc, left = 0, t.nbytes
            while left > 0:
                data = rnd.randbytes(min(_CHUNK, left))
                f.write(data)
                digest.update(data)
                crc = checksums.crc64nvme(data, crc)
                left -= len(data)
            crcs[t.name] = crc
    os.replace(tmp, path)
    return digest.hexdigest(), crcs


def config_json(s: ModelShape) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.hidden,
            "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
            "num_attention_heads": s.hidden // 64, "num_key_value_heads": s.kv_dim // 64, "head_dim": 64,
            "vocab_size": s.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def tokenizer_json(vocab: int) -> dict[str, Any]:
    """A byte-level BPE tokenizer's shape: a vocabulary and merges, made up."""
    rnd = random.Random(tensor_seed("tokenizer"))
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = {f"<0x{b:02X}>": b for b in range(256)}
    while len(words) < vocab:
        w = ("\u0120" if rnd.random() < 0.5 else "") + "".join(rnd.choice(letters) for _ in range(rnd.randint(2, 9)))
        words.setdefault(w, len(words))
    merges = [f"{w[: len(w) // 2]} {w[len(w) // 2:]}" for w in list(words)[256:]]
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": c, "special": True} for i, c in enumerate(["<unk>", "<s>", "</s>"])],
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "vocab": words, "merges": merges}}


@dataclass
class Checkpoint:
    profile: Profile
    shape: ModelShape
    root: Path  # the local copy
    files: dict[str, tuple[int, str]]  # file name -> (size, sha256)
    crcs: dict[str, int]  # tensor name -> CRC64-NVME of its bytes
    weight_map: dict[str, str]  # tensor name -> shard

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    @property
    def rels(self) -> list[str]:
        """Dataset-style relative paths (`checkpoint/<file>`) of every file."""
        return [f"{FOLDER}/{f}" for f in sorted(self.files)]

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.files.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in tensors(self.shape))

    def key(self, name: str) -> str:
        return f"{self.profile.name}/{FOLDER}/{name}"

    @property
    def reference(self) -> Path:
        """The JSON a loader checks its tensors against (written beside the local copy)."""
        return self.root / "reference.json"

    def manifest(self) -> dict[str, Any]:
        return {"version": CHECKPOINT_VERSION, "shape": asdict(self.shape),
                "files": {f: list(v) for f, v in sorted(self.files.items())}}


def ensure_checkpoint(p: Profile, data_home: Path, log: Callable[[str], None]) -> Checkpoint:
    shape = SHAPES[p.name]
    root = data_home / f"{p.name}-checkpoint"
    mpath = root / "manifest.json"
    try:
        man = json.loads(mpath.read_text())
        ref = json.loads((root / "reference.json").read_text())
        if man.get("version") == CHECKPOINT_VERSION and man.get("shape") == asdict(shape):
            known = {f: (int(v[0]), str(v[1])) for f, v in man["files"].items()}
            if all((root / f).is_file() and (root / f).stat().st_size == v[0] for f, v in known.items()):
                return Checkpoint(p, shape, root, known, {k: int(v["crc64nvme"]) for k, v in ref["tensors"].items()},
                                  {k: v["file"] for k, v in ref["tensors"].items()})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log(f"generating the {p.name} checkpoint in {root}")
    t0 = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ts = tensors(shape)
    by_shard = assign_shards(ts, shape.shards)
    files: dict[str, tuple[int, str]] = {}
    crcs: dict[str, int] = {}
    weight_map = {t.name: shard for shard, group in by_shard.items() for t in group}
    for shard, group in by_shard.items():
        sha, c = write_shard(root / shard, group)
        crcs.update(c)
        files[shard] = ((root / shard).stat().st_size, sha)
    small = {"config.json": config_json(shape), "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2},
             "tokenizer.json": tokenizer_json(shape.vocab),
             INDEX: {"metadata": {"total_size": sum(t.nbytes for t in ts)}, "weight_map": weight_map}}
    for name, obj in small.items():
        raw = json.dumps(obj, indent=2 if name != "tokenizer.json" else None, ensure_ascii=False).encode()
        (root / name).write_bytes(raw)
        files[name] = (len(raw), hashlib.sha256(raw).hexdigest())
    by_name = {t.name: t for t in ts}
    ref = {"version": CHECKPOINT_VERSION, "shards": sorted(by_shard),
           "tensors": {n: {"file": weight_map[n], "dtype": by_name[n].dtype, "shape": list(by_name[n].shape),
                           "crc64nvme": crcs[n]} for n in sorted(by_name)}}
    (root / "reference.json").write_text(json.dumps(ref, indent=0))
    ck = Checkpoint(p, shape, root, files, crcs, weight_map)
    mpath.write_text(json.dumps(ck.manifest(), indent=0))
    log(f"generated {len(ts)} tensors in {len(by_shard)} shards, {ck.total_bytes / MiB:,.0f} MiB, "
        f"in {time.monotonic() - t0:.0f} s")
    return ck


def manifest_key(ck: Checkpoint) -> str:
    return f"_manifests/{ck.profile.name}-{FOLDER}.json"


def ensure_checkpoint_uploaded(ck: Checkpoint, client: Any, bucket: str, log: Callable[[str], None],
                               checksum: str = "") -> bool:
    """Upload every file unless the bucket's manifest already equals ours
    (with the additional checksum the PUTs send, data.upload_args)."""
    want = json.dumps({**ck.manifest(), **({"upload_checksum": checksum} if checksum else {})},
                      sort_keys=True).encode()
    try:
        if client.get_object(Bucket=bucket, Key=manifest_key(ck))["Body"].read() == want:
            return False
    except Exception:  # missing or unreadable: upload
        pass
    log(f"uploading the checkpoint to s3://{bucket}/{ck.profile.name}/{FOLDER}/ (one PUT per object)")
    t0 = time.monotonic()
    for name in sorted(ck.files):  # one at a time: a single PUT is streamed from disk
        with open(ck.root / name, "rb") as f:
            client.put_object(Bucket=bucket, Key=ck.key(name), Body=f, **upload_args(checksum))
    client.put_object(Bucket=bucket, Key=manifest_key(ck), Body=want)
    log(f"uploaded {len(ck.files)} objects in {time.monotonic() - t0:.0f} s")
    return True
