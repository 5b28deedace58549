"""A pinned mount started with the object store unreachable, over a prebaked
layer: a multipart copy that cannot be checked offline is refused for the
right reason, and the background work that fails (a model folder's small
files fetched ahead) says so at most as a WARNING."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from test_pinned import make_lock, versioned

from support.mounting import FS
from support.s3server import free_port

pytestmark = pytest.mark.fuse

P = "my-model/v3"
MiB = 1024 * 1024


def upload_in_parts(s3, bucket: str, key: str, data: bytes, part_size: int) -> None:
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    pieces = [data[i:i + part_size] for i in range(0, len(data), part_size)]
    done = [{"ETag": s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=n, Body=piece)["ETag"],
             "PartNumber": n} for n, piece in enumerate(pieces, 1)]
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": done})


@pytest.mark.log_errors(r'model\.safetensors" failed: cannot reach the object store')
def test_an_offline_pinned_mount_says_a_multipart_copy_could_not_be_checked_because_s3_is_unreachable(
        mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """Before, the refusal blamed "a lock with no version id to ask by" though the lock has one (the part
    sizes could not be asked: the store was down), and the fetch ahead of the index nobody opened logged
    an ERROR."""
    versioned(s3, bucket)
    key = f"{P}/model.safetensors"
    data = bytes(range(256)) * (20 * MiB // 256)
    upload_in_parts(s3, bucket, key, data, 8 * MiB)  # 8 + 8 + 4 MiB: part 1's size assumed for the rest
    config, index = b'{"architectures": ["X"]}', json.dumps({"weight_map": {"w": "model.safetensors"}}).encode()
    s3.put_object(Bucket=bucket, Key=f"{P}/config.json", Body=config)
    s3.put_object(Bucket=bucket, Key=f"{P}/model.safetensors.index.json", Body=index)
    lock = tmp_path / "model.lock.json"
    doc = make_lock(proxy, bucket, lock)
    [entry] = [o for o in doc["folders"][0]["objects"] if o["key"] == key]
    assert entry["version_id"] and entry["checksum"]["algorithm"] == "MD5-multipart"
    assert entry["checksum"]["parts_confirmed"] is False
    layer = tmp_path / "image"
    (layer / P).mkdir(parents=True)
    (layer / f"{P}/config.json").write_bytes(config)
    (layer / key).write_bytes(b"\0" * len(data))  # replaced: the right size, other bytes
    m = mount("--lock", str(lock), "--prebaked", str(layer), "--retries", "1", store=tmp_path / "store",
              endpoint=f"http://127.0.0.1:{free_port()}")
    assert fs.read(m.file(f"{P}/config.json")) == config  # a loader's first read: its companions fetched ahead
    with pytest.raises(OSError) as info:
        fs.read(m.file(key), timeout=120)
    assert info.value.errno == errno.EIO
    log = m.log()
    assert "no version id" not in log
    refused = [ln for ln in log.splitlines() if "not serving the copy" in ln and key in ln]
    assert len(refused) == 1, log
    assert "cannot check the local copy's content without the object store (cannot reach the object store" \
        in refused[0]
    ahead = [ln for ln in log.splitlines() if "model.safetensors.index.json" in ln and "failed" in ln]
    assert ahead and all(" ERROR " not in ln for ln in ahead), ahead
    assert len(ahead) == 1, ahead
