"""End to end: `--verify etag` on an offline start.  A prebaked copy of the
right size and the wrong content is checked against the saved listing's ETag
when the object store cannot be reached, and one that could not be checked
then is checked once the object store answers again (probe.PrebakedCheck).

Before, the check's HEAD failed, the copy was taken by its size, and that
verdict held for the mount's life: the wrong bytes were served offline and
still after the object store came back, with `user.lazyfs.verified` "size"."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, wait_until
from support.proxy import Fault

pytestmark = pytest.mark.fuse

P = "models/m"
MiB = 1024 * 1024
# The store cannot be reached: every connection is reset before an answer (after one retry).  (An
# error status is an answer: the object store is reachable, and the start is no offline one.)
DOWN = Fault("drop", method=None, times=None)


def put_multipart(s3, bucket: str, key: str, data: bytes, part: int) -> None:
    up = s3.create_multipart_upload(Bucket=bucket, Key=key)
    parts = []
    for n, start in enumerate(range(0, len(data), part), 1):
        resp = s3.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=n,
                              Body=data[start:start + part])
        parts.append({"ETag": resp["ETag"], "PartNumber": n})
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": parts})


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def prebaked_then_offline(mount, proxy, s3, bucket: str, tmp_path: Path, objects: dict[str, bytes],
                          layer: dict[str, bytes], *flags: str):
    """Put `objects`, copy `layer` (same sizes) into a prebaked layer, mount once online (the listing is
    saved with the ETags), then mount again with the object store down."""
    for key, data in objects.items():
        if key.endswith(".safetensors"):
            put_multipart(s3, bucket, key, data, part=6 * MiB)  # no common uploader's part size
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=data)
    pb, store = tmp_path / "pb", tmp_path / "store"
    for key, data in layer.items():
        (pb / key).parent.mkdir(parents=True, exist_ok=True)
        (pb / key).write_bytes(data)
    args = ("--prefix", f"s3://{bucket}/{P}", "--prebaked", str(pb), "--verify", "etag", "--retries", "1",
            "--refresh", "1", *flags)
    m = mount(*args, store=store)
    wait_until(lambda: any((store / ".lazyfs" / "listings").glob("*.json")), what="the saved listing")
    m.stop()
    proxy.add(DOWN)
    m2 = mount(*args, store=store)
    assert "ready OFFLINE" in m2.process.stdout_lines[0]
    return m2


def back_online(m, proxy) -> None:
    proxy.clear_faults()
    wait_until(lambda: "online again, the object store answered" in m.log(), timeout=60, what="going online")


@pytest.mark.log_errors("listing failed", "has no current local copy and the mount is offline")
def test_offline_a_wrong_prebaked_copy_is_checked_against_the_saved_etag(mount, proxy, s3, bucket, fs: FS,
                                                                         tmp_path: Path):
    tok, cfg = f"{P}/tokenizer.json", f"{P}/config.json"
    objects = {tok: os.urandom(3000), cfg: b'{"model_type": "llama"}' * 40}
    layer = {tok: flipped(objects[tok], 100), cfg: objects[cfg]}  # right size, one byte wrong
    m = prebaked_then_offline(mount, proxy, s3, bucket, tmp_path, objects, layer)
    heads = proxy.count("HEAD")
    # Both copies are on disk, counted once, as copies an open checks by content.
    assert ("starting offline with the 2 files the store knows, 2 of them on disk (2 with no identity record, "
            "checked by content when opened: one that does not match is not served)") in m.log(), m.log()
    assert fs.read(m.file(cfg)) == objects[cfg]
    assert fs.run(os.getxattr, str(m.file(cfg)), "user.lazyfs.verified") == b"MD5", "checked, not by size"
    try:
        got = fs.read(m.file(tok))
    except OSError as e:
        assert e.errno == errno.EIO  # not on disk as it is: nothing else to serve offline
    else:
        assert got == objects[tok], "the wrong bytes were served"
    assert "does not match the listed ETag" in m.log()
    # Offline, no copy's check asks the object store (each HEAD's retries held its first open up).
    assert proxy.count("HEAD") == heads, proxy.requests("HEAD")
    # Not ready: the copy is refused.  And what the mount serves is said truly (there is a saved listing
    # here, but a mount started from a prebaked layer alone has none).
    res = lazyfs_cli(["status", "--prefix", f"s3://{bucket}/{P}", "--store", str(m.path), "--require-all"])
    assert res.returncode == 1 and "1 stale" in res.stdout, res.stdout
    assert "the mount serves what its store knows (a saved listing, if any, and the files on disk)" in res.stdout
    back_online(m, proxy)
    assert fs.read(m.file(tok)) == objects[tok]  # checked again, refused, downloaded
    assert fs.run(os.getxattr, str(m.file(tok)), "user.lazyfs.state") == b"cached"


# What no request can check: a multipart ETag of a part size no common uploader
# uses (two parts of 6 MiB), and with --no-etag-check any ETag (the store's
# CRC32, checked once it answers, is not in a listing).
UNCHECKABLE = {"multipart": (f"{P}/model.safetensors", 6 * MiB + 100_000, (), "MD5-multipart"),
               "no-etag-check": (f"{P}/tokenizer.json", 3000, ("--no-etag-check",), "CRC32"),
               # Read through lazyfs: the kernel caches the wrong copy's pages for the file's inode.
               "no-passthrough": (f"{P}/tokenizer.json", 3000, ("--no-etag-check", "--no-passthrough"), "CRC32")}


@pytest.mark.log_errors("listing failed")
@pytest.mark.parametrize("case", sorted(UNCHECKABLE))
def test_a_copy_that_could_not_be_checked_offline_is_checked_once_the_store_answers(mount, proxy, s3, bucket,
                                                                                    fs: FS, tmp_path: Path,
                                                                                    case: str):
    key, size, flags, algorithm = UNCHECKABLE[case]
    data = os.urandom(size)
    m = prebaked_then_offline(mount, proxy, s3, bucket, tmp_path, {key: data}, {key: flipped(data, 100)}, *flags)
    heads = proxy.count("HEAD")
    # Served by its size offline (the seed's rule: what prebaked copies are for), and said so.
    assert fs.read(m.file(key), timeout=60) == flipped(data, 100)
    assert proxy.count("HEAD") == heads, "an offline mount asked the object store about its copy"
    assert "using it as its size matches, until the object store answers: the next open then checks its " \
           "content" in m.log(), m.log()
    back_online(m, proxy)
    # Checked, refused, downloaded; the kernel's pages of the copy served before are dropped.
    assert fs.read(m.file(key), timeout=60) == data, "the copy judged by its size offline was served again"
    assert fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.verified") == algorithm.encode()
    assert f"does not match the object's {algorithm}; not serving it" in m.log()
