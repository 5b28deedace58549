"""Pinned deployments (issue 14), end to end through the CLI against moto
behind the counting proxy: `lazyfs lock`, `mount --lock` (zero requests at
start, the locked bytes by version id after an overwrite in a versioned
bucket, a clear ESTALE and one log line in an unversioned one, drift
reported and nothing else), `bake --lock` and `--write-lock`, `status --lock
--require-all` (and `--verify content`), `diff`, and locks refused in one
line with exit 2."""

from __future__ import annotations

import errno
import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, on_both_clients, wait_until, write_model_json
from support.s3server import free_port

pytestmark = pytest.mark.fuse

P = "my-model/v3"


def versioned(s3, bucket: str) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})


def upload(s3, bucket: str, files: dict[str, bytes], prefix: str = P) -> dict[str, str]:
    """key -> version id ("" in a bucket that keeps none)."""
    out = {}
    for name, data in files.items():
        resp = s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
        out[f"{prefix}/{name}"] = resp.get("VersionId") or ""
    return out


def make_lock(proxy, bucket: str, out: Path, prefix: str = P) -> dict:
    res = lazyfs_cli(["lock", "--prefix", f"s3://{bucket}/{prefix}", "--endpoint-url", proxy.endpoint,
                      "-o", str(out)])
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("lazyfs lock: ") and str(out) in res.stdout
    return json.loads(out.read_text())


def model(n: int = 3) -> dict[str, bytes]:
    return {"config.json": b'{"layers": %d}' % n, "tokenizer.json": os.urandom(30_000),
            "model.safetensors": os.urandom(3 * 1024 * 1024 + n)}


@on_both_clients
def test_a_pinned_mount_starts_with_no_request_and_serves_the_locked_bytes_by_version_id(
        mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    versioned(s3, bucket)
    approved = model()
    ids = upload(s3, bucket, approved)
    proxy.clear()
    doc = make_lock(proxy, bucket, tmp_path / "model.lock.json")
    assert (proxy.count("LIST"), proxy.count("HEAD")) == (1, 3), "one listing, one HEAD per object"
    assert {o["key"]: o["version_id"] for o in doc["folders"][0]["objects"]} == ids
    overwritten = os.urandom(3 * 1024 * 1024 + 3)
    s3.put_object(Bucket=bucket, Key=f"{P}/model.safetensors", Body=overwritten)  # after the approval
    proxy.clear()
    m = mount("--lock", str(tmp_path / "model.lock.json"), "--prefix", f"s3://{bucket}/{P}",
              store=tmp_path / "store")
    assert m.process.stdout_lines[0].startswith("lazyfs: ready PINNED: ")
    assert "each by its version id" in m.process.stdout_lines[0]
    assert proxy.count() == 0, f"a pinned mount started with requests: {proxy.requests()}"
    assert fs.listdir(m.path / P) == sorted(approved)
    assert proxy.count() == 0, "listing a pinned mount sends no request"
    for name, data in approved.items():
        assert fs.read(m.file(f"{P}/{name}")) == data
    gets = proxy.requests("GET")
    assert gets and {r["query"].get("versionId") for r in gets} == {ids[r["key"]] for r in gets}
    assert proxy.count("LIST") == 0 and proxy.count("HEAD") == 0, "what to check against came from the lock"
    key = f"{P}/model.safetensors"
    wait_until(lambda: fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.state") == b"cached", what="publication")
    algorithm = next(o["checksum"]["algorithm"] for o in doc["folders"][0]["objects"] if o["key"] == key)
    assert fs.run(os.getxattr, str(m.file(key)), "user.lazyfs.verified") == algorithm.encode()
    assert (tmp_path / "store" / key).read_bytes() == approved["model.safetensors"]
    # A fresh mount that is not pinned serves what the bucket holds now.
    fresh = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "fresh")
    assert fs.read(fresh.file(key)) == overwritten


@on_both_clients
@pytest.mark.log_errors("which the bucket no longer has")
def test_an_overwrite_in_an_unversioned_bucket_fails_the_file_clearly_and_serves_nothing_else(
        mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    approved = model()
    upload(s3, bucket, approved)
    doc = make_lock(proxy, bucket, tmp_path / "model.lock.json")
    locked = {o["key"]: o for o in doc["folders"][0]["objects"]}
    key = f"{P}/model.safetensors"
    assert locked[key]["version_id"] is None
    now = s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(3 * 1024 * 1024 + 3))["ETag"].strip('"')
    m = mount("--lock", str(tmp_path / "model.lock.json"), store=tmp_path / "store")
    assert "by version id or ETag" in m.process.stdout_lines[0]
    with pytest.raises(OSError) as info:
        fs.read(m.file(key))
    assert info.value.errno == errno.ESTALE
    gets = proxy.count("GET", key)
    with pytest.raises(OSError) as again:
        fs.read(m.file(key))
    assert again.value.errno == errno.ESTALE and proxy.count("GET", key) == gets, "refused at the open"
    lines = [ln for ln in m.log().splitlines() if "which the bucket no longer has" in ln]
    assert len(lines) == 1, lines
    assert key in lines[0] and f"ETag {locked[key]['etag']}" in lines[0] and f"it now holds ETag {now}" in lines[0]
    assert not (tmp_path / "store" / key).exists(), "nothing of the new version was kept"
    assert fs.read(m.file(f"{P}/config.json")) == approved["config.json"], "the other files are served"
    stats = json.loads(fs.read(m.path / ".lazyfs" / "stats.json"))
    assert stats["pinned"]["unavailable"] == [key]


def test_drift_is_reported_and_nothing_is_fetched_or_swapped(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    versioned(s3, bucket)
    approved = model()
    upload(s3, bucket, approved)
    make_lock(proxy, bucket, tmp_path / "model.lock.json")
    s3.put_object(Bucket=bucket, Key=f"{P}/model.safetensors", Body=b"changed")
    s3.delete_object(Bucket=bucket, Key=f"{P}/tokenizer.json")
    s3.put_object(Bucket=bucket, Key=f"{P}/extra.bin", Body=b"added")
    port = free_port()
    proxy.clear()
    m = mount("--lock", str(tmp_path / "model.lock.json"), "--refresh", "0", "--metrics-port", str(port),
              store=tmp_path / "store")
    m.process.send(signal.SIGHUP)
    wait_until(lambda: "drift check:" in m.log(), what="the drift check")
    assert {r["kind"] for r in proxy.requests()} == {"LIST"}, "a drift check only lists"
    assert fs.listdir(m.path / P) == sorted(approved), "the lock's files, as they were"
    assert fs.read(m.file(f"{P}/tokenizer.json")) == approved["tokenizer.json"], "deleted: fetched by version id"
    stats = json.loads(fs.read(m.path / ".lazyfs" / "stats.json"))
    pinned = stats["pinned"]
    assert pinned["digest"].startswith("sha256:") and pinned["files"] == 3 and pinned["by_version_id"] == 3
    assert (pinned["drift"]["changed"], pinned["drift"]["deleted"], pinned["drift"]["added"]) == (1, 1, 1)
    assert pinned["drift"]["keys"]["changed"] == [f"{P}/model.safetensors"] and pinned["unavailable"] == []
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "lazyfs_pinned 1.0" in metrics and f'digest="{pinned["digest"]}"' in metrics
    assert 'lazyfs_pinned_drift_objects{kind="changed"} 1.0' in metrics
    res = lazyfs_cli(["status", "--store", str(m.path), "--prefix", f"s3://{bucket}/{P}"])
    assert f"pinned to lock {pinned['digest'][:19]}" in res.stdout, res.stdout
    assert "drift since the lock: 1 changed, 1 deleted, 1 added" in res.stdout
    js = json.loads(lazyfs_cli(["status", "--store", str(m.path), "--prefix", f"s3://{bucket}/{P}", "--json"]).stdout)
    assert js["pinned"] == pinned["digest"]


def test_bake_with_a_lock_status_proves_it_and_a_pinned_start_downloads_nothing(mount, proxy, s3, bucket, fs: FS,
                                                                                 tmp_path: Path):
    versioned(s3, bucket)
    approved = model()
    upload(s3, bucket, approved)
    lock = tmp_path / "model.lock.json"
    make_lock(proxy, bucket, lock)
    s3.put_object(Bucket=bucket, Key=f"{P}/config.json", Body=b'{"layers": 99}')  # after the approval
    image = tmp_path / "image-store"
    res = lazyfs_cli(["bake", "--lock", str(lock), "--endpoint-url", proxy.endpoint, "--to", str(image)])
    assert res.returncode == 0, res.stderr
    assert "3 files: 3 downloaded" in res.stdout
    for name, data in approved.items():
        assert (image / P / name).read_bytes() == data, f"{name}: not the locked bytes"
    for extra in ([], ["--verify", "content"]):
        res = lazyfs_cli(["status", "--lock", str(lock), "--store", str(image), "--require-all", *extra])
        assert res.returncode == 0, res.stdout + res.stderr
        assert "3 cached" in res.stdout and "matches lock" in res.stdout
    proxy.clear()
    m = mount("--lock", str(lock), store=image)
    for name, data in approved.items():
        assert fs.read(m.file(f"{P}/{name}")) == data
    assert proxy.count() == 0, f"a prebaked pinned pod sent requests: {proxy.requests()}"
    m.stop()
    # Bytes changed on disk in place, the identity record kept: the mtime moved, so the record no longer
    # describes the file; one that also sets the mtime back is found only by hashing the content.
    target = image / P / "tokenizer.json"
    recorded = target.stat().st_mtime_ns
    os.chmod(target, 0o600)
    with open(target, "r+b") as f:
        f.write(b"X")
    res = lazyfs_cli(["status", "--lock", str(lock), "--store", str(image), "--require-all"])
    assert res.returncode == 1 and "2 cached, 1 prebaked" in res.stdout, res.stdout
    os.utime(target, ns=(recorded, recorded))
    res = lazyfs_cli(["status", "--lock", str(lock), "--store", str(image), "--require-all"])
    assert res.returncode == 0, "by identity record it matches again"
    res = lazyfs_cli(["status", "--lock", str(lock), "--store", str(image), "--require-all", "--verify", "content",
                      "--json"])
    assert res.returncode == 1
    rows = {r["path"]: r for r in json.loads(res.stdout)["files"]}
    assert rows[f"{P}/tokenizer.json"]["state"] == "stale" and rows[f"{P}/config.json"]["state"] == "cached"


def state_of(fs: FS, path: Path) -> tuple[str, str]:
    """(user.lazyfs.state, user.lazyfs.verified) of a file of a mount."""
    state, verified = (fs.run(os.getxattr, str(path), f"user.lazyfs.{n}").decode() for n in ("state", "verified"))
    return state, verified


def test_an_unrecorded_copy_is_served_pinned_or_baked_only_once_its_bytes_match_the_lock(
        mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """Copies with no identity record, of the locked size: the locked bytes are kept (and recorded), any other
    bytes are replaced by the locked version, or, in a read-only --prebaked layer, passed over for it."""
    versioned(s3, bucket)
    approved = model()
    upload(s3, bucket, approved)
    lock = tmp_path / "model.lock.json"
    doc = make_lock(proxy, bucket, lock)
    algorithm = {o["key"]: o["checksum"]["algorithm"] for o in doc["folders"][0]["objects"]}
    wrong = {name: bytes(len(data)) for name, data in approved.items()}  # zeros: the right size
    image = tmp_path / "image"
    (image / P).mkdir(parents=True)
    (image / P / "tokenizer.json").write_bytes(approved["tokenizer.json"])
    (image / P / "model.safetensors").write_bytes(wrong["model.safetensors"])
    res = lazyfs_cli(["bake", "--lock", str(lock), "--endpoint-url", proxy.endpoint, "--to", str(image)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 files: 2 downloaded" in res.stdout and "1 already current" in res.stdout, res.stdout
    for name, data in approved.items():
        assert (image / P / name).read_bytes() == data, f"{name}: not the locked bytes"
    res = lazyfs_cli(["status", "--lock", str(lock), "--store", str(image), "--require-all"])
    assert res.returncode == 0 and "3 cached" in res.stdout, res.stdout  # the right copy, checked and recorded

    layer, store = tmp_path / "layer", tmp_path / "store"
    (layer / P).mkdir(parents=True)
    (layer / P / "config.json").write_bytes(approved["config.json"])
    (layer / P / "model.safetensors").write_bytes(wrong["model.safetensors"])
    (store / P).mkdir(parents=True)
    (store / P / "tokenizer.json").write_bytes(wrong["tokenizer.json"])
    proxy.clear()
    m = mount("--lock", str(lock), "--prebaked", str(layer), store=store)
    for name, data in approved.items():
        assert fs.read(m.file(f"{P}/{name}")) == data, f"{name}: not the locked bytes"
    assert proxy.count("GET", f"{P}/config.json") == 0, "the layer's right copy is served"
    assert proxy.count("GET", f"{P}/model.safetensors") > 0 and proxy.count("GET", f"{P}/tokenizer.json") > 0
    key = f"{P}/config.json"
    assert state_of(fs, m.file(key)) == ("prebaked", algorithm[key]), "checked by content, not by size"
    for name in ("model.safetensors", "tokenizer.json"):
        wait_until(lambda name=name: state_of(fs, m.file(f"{P}/{name}"))[0] == "cached", what=f"{name} published")
    assert (layer / P / "model.safetensors").read_bytes() == wrong["model.safetensors"], "a layer is never written"
    assert (store / P / "tokenizer.json").read_bytes() == approved["tokenizer.json"]


def upload_multipart(s3, bucket: str, key: str, parts: int, part_size: int = 5 * 1024 * 1024) -> bytes:
    """An object of `parts` equal parts (moto's least part size): its ETag is the multipart kind."""
    data = os.urandom(parts * part_size)
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    done = [{"ETag": s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=n,
                                    Body=data[(n - 1) * part_size:n * part_size])["ETag"], "PartNumber": n}
            for n in range(1, parts + 1)]
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": done})
    return data


@pytest.mark.parametrize("keeps_versions", [False, True], ids=["unversioned", "versioned"])
def test_a_rejected_multipart_copy_asks_nothing_but_the_locked_version(
        mount, proxy, s3, bucket, fs: FS, tmp_path: Path, keeps_versions: bool):
    """A lock that confirms only part 1 of a multipart upload (parts_confirmed: false), and a copy of the
    right size with other bytes: the copy fails the multipart ETag recomputed from the sizes the lock assumes.
    Asking the store for each part's size (HEAD ?partNumber=N) would describe whatever the key holds now:
    without a version id to ask by, nothing is asked; with one, only that version is."""
    if keeps_versions:
        versioned(s3, bucket)
    key = f"{P}/model-00001-of-00002.safetensors"
    data = upload_multipart(s3, bucket, key, parts=5)
    lock = tmp_path / "v3.lock.json"
    doc = make_lock(proxy, bucket, lock)
    [entry] = [o for o in doc["folders"][0]["objects"] if o["key"] == key]
    assert entry["checksum"]["algorithm"] == "MD5-multipart" and entry["checksum"]["parts_confirmed"] is False
    layer = tmp_path / "pbro"
    (layer / P).mkdir(parents=True)
    (layer / key).write_bytes(bytes(len(data)))  # the right size, other bytes
    proxy.clear()
    m = mount("--lock", str(lock), "--prebaked", str(layer), store=tmp_path / "store")
    assert fs.read(m.file(key), timeout=120) == data
    wait_until(lambda: state_of(fs, m.file(key))[0] == "cached", what="publication")
    heads = proxy.requests("HEAD")
    if keeps_versions:  # the sizes of the locked version's parts: they show the copy's bytes are not its
        assert all(r["query"].get("versionId") == entry["version_id"] for r in heads), heads
        assert "the local copy in the prebaked layer does not match the locked version's" in m.log()
    else:
        assert heads == [], f"a pinned mount asked about the bucket's current object: {heads}"
        assert "its part sizes are not known, so it cannot be shown to be the locked version" in m.log()
    gets = proxy.requests("GET", key)
    assert gets and all(r["query"].get("versionId") == (entry["version_id"] or None) for r in gets), gets
    assert (layer / key).read_bytes() == bytes(len(data)), "a layer is never written"


@pytest.mark.log_errors("cannot reach the object store")
def test_a_rejected_store_copy_is_passed_over_for_a_prebaked_layer_that_has_the_locked_one(
        mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """The search goes on past a copy that fails the lock's check, through the later layers in order, as if
    that copy were absent: the first that matches is served, online without a GET, and offline too."""
    versioned(s3, bucket)
    approved = model()
    upload(s3, bucket, approved)
    lock = tmp_path / "model.lock.json"
    make_lock(proxy, bucket, lock)
    key, other = f"{P}/model.safetensors", f"{P}/tokenizer.json"
    store, wrong_layer, right_layer = tmp_path / "store", tmp_path / "wrong", tmp_path / "right"
    for folder, data in ((store, bytes(len(approved["model.safetensors"]))),  # the right size, wrong bytes
                         (wrong_layer, b"\xff" * len(approved["model.safetensors"])),
                         (right_layer, approved["model.safetensors"])):
        (folder / P).mkdir(parents=True)
        (folder / key).write_bytes(data)
    layers = ("--prebaked", str(wrong_layer), "--prebaked", str(right_layer))
    proxy.clear()
    m = mount("--lock", str(lock), *layers, store=store)
    assert fs.read(m.file(key)) == approved["model.safetensors"]
    assert proxy.count("GET", key) == 0, "the last layer's matching copy is served, not downloaded"
    assert state_of(fs, m.file(key))[0] == "prebaked"
    m.stop()
    # status hashing the copies judges the one the mount serves, not the first it meets
    res = lazyfs_cli(["status", "--lock", str(lock), "--store", str(store), *layers, "--verify", "content", "--json"])
    rows = {r["path"]: r for r in json.loads(res.stdout)["files"]}
    assert rows[key]["state"] == "prebaked" and rows[key]["content"] == "match", rows[key]
    offline = mount("--lock", str(lock), *layers, store=store, endpoint=f"http://127.0.0.1:{free_port()}")
    assert fs.read(offline.file(key)) == approved["model.safetensors"]
    with pytest.raises(OSError) as info:  # nothing on disk at all: EIO, as before
        fs.read(offline.file(other), timeout=60)
    assert info.value.errno == errno.EIO
    assert (store / key).read_bytes() == bytes(len(approved["model.safetensors"])), "the store's copy is untouched"


def test_a_store_file_overwritten_in_place_is_not_its_recorded_version_any_more(mount, proxy, s3, bucket, fs: FS,
                                                                                tmp_path: Path):
    """`cp` over a baked file keeps its inode and identity xattr; its mtime moves, so the record is not the
    file's: status does not count it, a pinned mount fetches the locked bytes, a dynamic one judges it by size."""
    versioned(s3, bucket)
    approved = model()
    upload(s3, bucket, approved)
    lock = tmp_path / "model.lock.json"
    make_lock(proxy, bucket, lock)
    image = tmp_path / "image"
    res = lazyfs_cli(["bake", "--lock", str(lock), "--endpoint-url", proxy.endpoint, "--to", str(image)])
    assert res.returncode == 0, res.stdout + res.stderr
    key = f"{P}/model.safetensors"
    target = image / key

    def overwrite_in_place() -> None:
        inode = target.stat().st_ino
        with open(target, "r+b") as f:
            f.write(bytes(len(approved["model.safetensors"])))
        assert target.stat().st_ino == inode and "user.lazyfs.identity" in os.listxattr(target)

    overwrite_in_place()
    res = lazyfs_cli(["status", "--lock", str(lock), "--store", str(image), "--require-all", "--json"])
    assert res.returncode == 1, res.stdout
    assert {r["path"]: r["state"] for r in json.loads(res.stdout)["files"]}[key] == "prebaked"
    proxy.clear()
    m = mount("--lock", str(lock), store=image)
    assert fs.read(m.file(key)) == approved["model.safetensors"]
    assert proxy.count("GET", key) > 0 and proxy.count("GET", f"{P}/config.json") == 0
    wait_until(lambda: state_of(fs, m.file(key))[0] == "cached", what="the locked version published")
    m.stop()
    assert target.read_bytes() == approved["model.safetensors"]
    overwrite_in_place()
    d = mount("--prefix", f"s3://{bucket}/{P}", store=image)
    assert state_of(fs, d.file(key)) == ("prebaked", "size"), "the dynamic mount's rule for unrecorded copies"
    assert state_of(fs, d.file(f"{P}/config.json"))[0] == "cached"


def test_bake_write_lock_and_diff_of_two_versions(proxy, s3, bucket, tmp_path: Path):
    v3 = model(3)
    upload(s3, bucket, v3)
    v4 = dict(v3, **{"model.safetensors": os.urandom(2 * 1024 * 1024)})
    upload(s3, bucket, v4, prefix="my-model/v4")
    (tmp_path / "v3.json").write_text(json.dumps({"download_files_from": f"s3://{bucket}/{P}"}))
    res = lazyfs_cli(["bake", "--config", str(tmp_path / "v3.json"), "--write-lock", str(tmp_path / "v3.lock.json"),
                      "--endpoint-url", proxy.endpoint, "--to", str(tmp_path / "image")])
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "v3.lock.json").read_text())
    assert doc["config"][0]["path"].endswith("v3.json") and len(doc["folders"][0]["objects"]) == 3
    for o in doc["folders"][0]["objects"]:
        ident = json.loads(os.getxattr(tmp_path / "image" / o["key"], "user.lazyfs.identity"))
        assert (ident["etag"], ident["size"]) == (o["etag"], o["size"])
    make_lock(proxy, bucket, tmp_path / "v4.lock.json", prefix="my-model/v4")
    res = lazyfs_cli(["diff", str(tmp_path / "v3.lock.json"), str(tmp_path / "v4.lock.json")])
    assert res.returncode == 0, res.stderr
    assert "the switch downloads 1 file, 2.0 MiB; 2 files" in res.stdout
    assert "download" in res.stdout and "my-model/v4/model.safetensors" in res.stdout
    js = json.loads(lazyfs_cli(["diff", str(tmp_path / "v3.lock.json"), str(tmp_path / "v4.lock.json"),
                                "--json"]).stdout)
    assert js["download"] == {"files": 1, "bytes": 2 * 1024 * 1024, "keys": ["my-model/v4/model.safetensors"]}
    assert js["link"]["files"] == 2 and js["removed"]["files"] == 3


def one_line_error(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lazyfs: error: ") and "Traceback" not in res.stderr, res.stderr
    return lines[0]


@pytest.fixture
def locks(tmp_path: Path) -> dict[str, Path]:
    """A good lock (made without S3: a lock of nothing but one folder) and bad ones."""
    from lazyfs import lockfile

    good = lockfile.make([lockfile.Folder("models", "my-model/v3/", ())], [], "test")
    text = lockfile.dumps(good)
    out = {"good": text, "truncated": text[: len(text) // 2], "malformed": '{"lazyfs_lock": 1, "folders": 3}',
           "tampered": text.replace('"my-model/v3/"', '"my-model/v4/"'), "not json": "this is not a lock\n"}
    one = lockfile.make([lockfile.Folder("models", "my-model/v3/", (
        lockfile.Entry("models", "my-model/v3/a.bin", 1, "e" * 32, "", 0, None),))], [], "test")
    newline = lockfile.make([lockfile.Folder("models", "my-model/v3/", (
        lockfile.Entry("models", "my-model/v3/a\nb.bin", 1, "e" * 32, "", 0, None),))], [], "test")
    out.update({"nested": "[" * 100_000 + "]" * 100_000, "newline key": lockfile.dumps(newline),
                # the last "key" is the one the digest was made of: json.loads alone would take the lock
                "key twice": lockfile.dumps(one).replace('{"key": ', '{"key": "my-model/v3/evil.bin", "key": ')})
    paths = {}
    for name, body in out.items():
        paths[name] = tmp_path / f"{name.replace(' ', '-')}.lock.json"
        paths[name].write_text(body)
    paths["fifo"] = tmp_path / "fifo.lock.json"
    os.mkfifo(paths["fifo"])
    paths["too big"] = tmp_path / "too-big.lock.json"
    with open(paths["too big"], "wb") as f:
        f.truncate((256 << 20) + 1)  # sparse: takes no disk
    (tmp_path / "mnt").mkdir()
    return paths


@pytest.mark.parametrize("command", ["mount", "bake", "status", "diff"])
@pytest.mark.parametrize("bad, message", [
    ("truncated", "not a complete lock file"), ("malformed", "no valid \"digest\""),
    ("tampered", "digest mismatch"), ("not json", "not a complete lock file"), ("missing", "file not found"),
    ("fifo", "is a FIFO (named pipe), not a lock file"), ("too big", "too big for a lock file (at most 256 MiB)"),
    ("nested", "arrays or objects nested too deeply"), ("key twice", '"key" is given twice'),
    ("newline key", r'key "my-model/v3/a\nb.bin" cannot be a path'),
])
def test_a_bad_lock_is_one_line_and_exit_2(command: str, bad: str, message: str, locks, tmp_path: Path):
    path = locks.get(bad, tmp_path / "missing.lock.json")
    argv = {"mount": ["mount", str(tmp_path / "mnt"), "--lock", str(path)],
            "bake": ["bake", "--lock", str(path), "--to", str(tmp_path)],
            "status": ["status", "--lock", str(path), "--store", str(tmp_path)],
            "diff": ["diff", str(locks["good"]), str(path)]}[command]
    line = one_line_error(lazyfs_cli(argv, timeout=30))  # a lock that is a FIFO must not block the reader
    assert f"lock {path}: " in line and message in line


@pytest.mark.parametrize("folder, reason", [
    ("s3://models/my-model/v4", "is for other folders: it pins s3://models/my-model/v3/ but the configuration "
                                "serves s3://models/my-model/v4/"),
    ("s3://staging/my-model/v3", "is for another bucket"),
])
def test_a_lock_of_other_folders_is_refused_with_the_reason(folder: str, reason: str, locks, tmp_path: Path):
    cfg = write_model_json(tmp_path / "model.json", download_files_from=folder)
    for argv in (["mount", str(tmp_path / "mnt")], ["bake", "--to", str(tmp_path)],
                 ["status", "--store", str(tmp_path)]):
        line = one_line_error(lazyfs_cli([*argv, "--config", str(cfg), "--lock", str(locks["good"])]))
        assert reason in line


@on_both_clients
def test_files_written_before_versioning_are_locked_by_etag_and_served_as_version_null_after_an_overwrite(
        mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """Uploaded, then versioning turned on: the objects are version "null",
    locked by ETag.  After an overwrite S3 keeps the locked bytes as version
    null.  Before, the pinned mount failed the file with ESTALE and `status`
    said "1 locked file the bucket no longer has"; now it is fetched as
    version null, with If-Match on the locked ETag (both transfer clients)."""
    approved = model()
    upload(s3, bucket, approved)
    versioned(s3, bucket)
    key = f"{P}/model.safetensors"
    lock = tmp_path / "model.lock.json"
    res = lazyfs_cli(["lock", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint, "-o", str(lock)])
    assert res.returncode == 0, res.stderr
    assert "keeps no versions" not in res.stdout
    assert "pinned by ETag (version null, written before versioning was on or while it was suspended: " \
           "an overwrite makes a file unavailable to a pinned mount only once the bucket no longer keeps it " \
           "as version null, never different)" in res.stdout
    etag = next(o["etag"] for o in json.loads(lock.read_text())["folders"][0]["objects"] if o["key"] == key)
    s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(3 * 1024 * 1024 + 3))
    s3.put_object(Bucket=bucket, Key=f"{P}/tokenizer.json", Body=b"overwritten")
    proxy.clear()
    m = mount("--lock", str(lock), "--refresh", "0", store=tmp_path / "store")
    assert fs.read(m.file(key)) == approved["model.safetensors"]
    gets = proxy.requests("GET", key)
    by_null = [r for r in gets if r["query"].get("versionId") == "null"]
    assert by_null and all(r["status"] == 412 for r in gets if r not in by_null), "the key (412), then version null"
    assert all(r["status"] in (200, 206) for r in by_null)
    assert {r["if_match"] for r in gets} == {f'"{etag}"'}, "every GET is pinned to the locked ETag"
    assert " ERROR " not in m.log()
    m.process.send(signal.SIGHUP)
    wait_until(lambda: "drift check:" in m.log(), what="the drift check")
    heads = proxy.requests("HEAD")
    assert heads and {(r["query"].get("versionId"), r["if_match"] != "") for r in heads} == {("null", True)}
    stats = json.loads(fs.read(m.path / ".lazyfs" / "stats.json"))
    assert stats["pinned"]["unavailable"] == []
    res = lazyfs_cli(["status", "--store", str(m.path)])
    assert res.returncode == 0, res.stderr
    assert "no longer has" not in res.stdout
    assert fs.read(m.file(f"{P}/tokenizer.json")) == approved["tokenizer.json"], "found by the drift check"


@pytest.mark.log_errors("and which the bucket does not serve as version null")
def test_a_file_locked_by_etag_whose_version_null_is_gone_too_is_estale(
        mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    approved = model()
    upload(s3, bucket, approved)
    versioned(s3, bucket)
    key = f"{P}/model.safetensors"
    lock = tmp_path / "model.lock.json"
    make_lock(proxy, bucket, lock)
    s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(3 * 1024 * 1024 + 3))
    s3.delete_object(Bucket=bucket, Key=key, VersionId="null")
    m = mount("--lock", str(lock), store=tmp_path / "store")
    with pytest.raises(OSError) as info:
        fs.read(m.file(key))
    assert info.value.errno == errno.ESTALE
    lines = [ln for ln in m.log().splitlines() if "pins" in ln and key in ln]
    assert len(lines) == 1, lines
    assert "which the bucket no longer has" not in lines[0]
    assert "which is no longer the object at that key, and which the bucket does not serve as version null" \
        in lines[0]
