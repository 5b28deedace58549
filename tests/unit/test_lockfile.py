"""Unit tests of the lock file (lockfile.py): what it records, that it reads
back exactly, that a changed, truncated or malformed lock is refused in one
line, and what a switch from one lock to another costs."""

from __future__ import annotations

import json

import pytest

from lazyfs import lockfile
from lazyfs.lockcmd import what_switch
from lazyfs.lockfile import ConfigRef, Entry, Folder, LockError
from lazyfs.modeljson import Source
from lazyfs.verify import Expectation

T = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z


def entry(key: str, data: str = "x", size: int = 10, version: str = "", check: Expectation | None = None) -> Entry:
    etag = (data * 32)[:32]
    return Entry("models", key, size, etag, version, T, check if check is not None else Expectation("MD5", etag))


def v3(**overrides: Entry) -> lockfile.Lock:
    entries = {"config.json": entry("my-model/v3/config.json", "a", 812, "va"),
               "model.safetensors": entry("my-model/v3/model.safetensors", "b", 3 << 20, "vb",
                                          Expectation("MD5-multipart", "b" * 32 + "-2", (2 << 20, 1 << 20), True)),
               "tokenizer.json": entry("my-model/v3/tokenizer.json", "c", 5000, "",
                                       Expectation("CRC32", "l0eQ5w=="))}
    entries.update(overrides)
    return lockfile.make([Folder("models", "my-model/v3/", tuple(entries.values()))],
                         [ConfigRef("model.json", "s3://models/my-model/v3")], "lazyfs test")


def test_a_lock_reads_back_exactly_what_was_written() -> None:
    lock = v3()
    text = lockfile.dumps(lock)
    back = lockfile.parse(text, "model.lock.json")
    assert back.folders == lock.folders and back.configs == lock.configs
    assert back.digest == lock.digest and back.digest.startswith("sha256:")
    assert back.path == "model.lock.json" and back.files == 3 and back.bytes == 812 + (3 << 20) + 5000
    rows = [line for line in text.splitlines() if '"key": ' in line]
    assert len(rows) == 3 and all('"etag": ' in r and '"checksum": ' in r for r in rows), \
        "one line per object, so a review shows one line per changed file"
    obj = back.objects()[0]
    assert (obj.key, obj.version_id, obj.etag) == ("my-model/v3/config.json", "va", "a" * 32)
    assert back.objects()[2].checksum_algorithm == "CRC32"
    assert not back.versioned, "tokenizer.json has no version id"
    assert lockfile.dumps(back) == text


def test_the_digest_covers_every_field() -> None:
    a = lockfile.make(v3().folders, v3().configs, "g", created="2026-01-01T00:00:00Z")
    b = lockfile.make(v3(**{"config.json": entry("my-model/v3/config.json", "a", 813, "va")}).folders,
                      v3().configs, "g", created="2026-01-01T00:00:00Z")
    assert a.digest != b.digest
    assert a.digest == lockfile.make(v3().folders, v3().configs, "g", created="2026-01-01T00:00:00Z").digest


def tampered(text: str, change: str, to: str) -> str:
    assert change in text
    return text.replace(change, to, 1)


def test_an_edited_lock_is_refused_in_one_line() -> None:
    text = lockfile.dumps(v3())
    with pytest.raises(LockError) as info:
        lockfile.parse(tampered(text, '"size": 812', '"size": 813'), "m.lock")
    message = str(info.value)
    assert message == ("lock m.lock: digest mismatch: the file was changed after lazyfs lock wrote it (edited, "
                       "truncated or corrupted); make a new lock with lazyfs lock")
    assert "\n" not in message


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99])
def test_a_truncated_lock_is_refused(cut: float) -> None:
    text = lockfile.dumps(v3())
    with pytest.raises(LockError, match=r"^lock m.lock: not a complete lock file: invalid JSON at line \d+"):
        lockfile.parse(text[:int(len(text) * cut)], "m.lock")


def rehashed(doc: dict) -> str:
    """A document with its digest recomputed: what a hand-made or buggy lock looks like."""
    doc["digest"] = lockfile.digest_of(doc)
    return json.dumps(doc)


def document() -> dict:
    return json.loads(lockfile.dumps(v3()))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("folders"), "the lock has no \"folders\""),
    (lambda d: d.update(folders=[]), "names no folder"),
    (lambda d: d["folders"][0]["objects"][0].update(size="812"), "\"size\" must be a whole number"),
    (lambda d: d["folders"][0]["objects"][0].update(size=True), "\"size\" must be a whole number"),
    (lambda d: d["folders"][0]["objects"][0].update(key="other/x"), "is not under its folder"),
    (lambda d: d["folders"][0]["objects"][0].update(key="my-model/v3/../x"), "cannot be a path"),
    (lambda d: d["folders"][0]["objects"][0].update(last_modified="yesterday"), "is not a UTC time"),
    (lambda d: d["folders"][0]["objects"][0].update(last_modified="2026-02-31T00:00:00Z"), "not a valid time"),
    (lambda d: d["folders"][0]["objects"][1]["checksum"].update(part_sizes=[1, 2]), "adding up to the size"),
    (lambda d: d["folders"][0]["objects"][0]["checksum"].update(algorithm="XXH3"), "unknown algorithm"),
    (lambda d: d["folders"][0].update(prefix="my-model/v3"), "not a normalized folder"),
    (lambda d: d["folders"][0].update(bucket="Not A Bucket!"), "is not a valid bucket name"),
    (lambda d: d["folders"][0]["objects"].append(d["folders"][0]["objects"][0]), "names a key twice"),
    (lambda d: d["folders"][0]["objects"][0].update(etag='x"\r\nX-Injected: 1'), "printable ASCII"),
    (lambda d: d["folders"][0]["objects"][0].update(version_id="a b"), "printable ASCII"),
])
def test_a_malformed_lock_is_refused_naming_the_member(edit, message: str) -> None:
    doc = document()
    edit(doc)
    with pytest.raises(LockError, match=message) as info:
        lockfile.parse(rehashed(doc), "m.lock")
    assert str(info.value).startswith("lock m.lock: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("[]", "not a lazyfs lock file"),
    ('{"download_files_from": "x"}', "not a lazyfs lock file"),
    ('{"lazyfs_lock": 2}', "lock format 2 is not one this lazyfs reads"),
    ('{"lazyfs_lock": 1}', "no valid \"digest\""),
    ("", "not a complete lock file"),
])
def test_what_is_not_a_lock_is_refused(text: str, message: str) -> None:
    with pytest.raises(LockError, match=message):
        lockfile.parse(text, "m.lock")


def test_a_lock_for_other_folders_is_refused_with_the_reason() -> None:
    lock = lockfile.parse(lockfile.dumps(v3()), "m.lock")
    lockfile.check_sources(lock, [Source("models", "my-model/v3/")])
    with pytest.raises(LockError, match=r"lock m.lock is for other folders: it pins s3://models/my-model/v3/ "
                                        r"but the configuration serves s3://models/my-model/v4/"):
        lockfile.check_sources(lock, [Source("models", "my-model/v4/")])
    with pytest.raises(LockError, match="is for another bucket"):
        lockfile.check_sources(lock, [Source("staging", "my-model/v3/")])


def test_a_switch_downloads_only_bytes_the_old_version_lacks() -> None:
    old = v3()
    v4 = [Entry(e.bucket, e.key.replace("/v3/", "/v4/"), e.size, e.etag, "", e.mtime_ns, e.check)
          for e in old.entries()]
    v4[1] = Entry("models", "my-model/v4/model.safetensors", 4 << 20, "d" * 32, "", T, None)
    new = lockfile.make([Folder("models", "my-model/v4/", tuple(v4))], [], "g")
    s = what_switch(old, new)
    assert s.total("download") == (1, 4 << 20)
    assert s.total("link") == (2, 812 + 5000)
    assert {c.source_key for c in s.of("link")} == {"my-model/v3/config.json", "my-model/v3/tokenizer.json"}
    assert len(s.removed) == 3
    same = what_switch(old, old)
    assert same.total("same") == (3, old.bytes) and same.total("download") == (0, 0) and not same.removed


def test_a_member_given_twice_is_refused_though_the_last_one_matches_the_digest() -> None:
    """json.loads alone takes the last: a reviewer reading the first would approve a lock that pins another key."""
    text = lockfile.dumps(v3())
    twice = tampered(text, '{"key": "my-model/v3/config.json"', '{"key": "my-model/v3/evil.json", '
                                                                  '"key": "my-model/v3/config.json"')
    assert json.loads(twice) == json.loads(text), "the digest matches what json.loads sees"
    with pytest.raises(LockError) as info:
        lockfile.parse(twice, "m.lock")
    assert str(info.value) == 'lock m.lock: "key" is given twice in one object; not written by lazyfs lock?'


def test_a_key_with_a_newline_is_refused_on_one_line() -> None:
    lock = v3(**{"config.json": entry("my-model/v3/a\nb\x1b[2J.json", "a", 812, "va")})
    with pytest.raises(LockError) as info:
        lockfile.parse(lockfile.dumps(lock), "m.lock")
    assert str(info.value) == (r'lock m.lock: folders[0].objects[0]: key "my-model/v3/a\nb\x1b[2J.json" '
                               "cannot be a path (control character in name)")


@pytest.mark.parametrize("bucket", ["bad!bucket", "ab", "a b"])
def test_a_lock_naming_a_bucket_s3_cannot_have_is_refused(bucket: str) -> None:
    doc = document()
    doc["folders"][0]["bucket"] = bucket
    with pytest.raises(LockError, match=f'^lock m.lock: "{bucket}" is not a valid bucket name'):
        lockfile.parse(rehashed(doc), "m.lock")


def test_a_lock_nested_too_deeply_is_a_lock_error() -> None:
    with pytest.raises(LockError, match=r"^lock m.lock: arrays or objects nested too deeply"):
        lockfile.parse("[" * 100_000 + "]" * 100_000, "m.lock")
    # around the depth Python can recurse to, wherever parsing or the digest stops
    for depth in range(800, 1100, 5):
        nested = "[" * depth + "]" * depth
        with pytest.raises(LockError, match=r"^lock m.lock: (arrays or objects nested too deeply|digest mismatch)"):
            lockfile.parse(f'{{"lazyfs_lock": 1, "digest": "sha256:{"0" * 64}", "config": {nested}}}', "m.lock")


def test_an_unknown_format_is_shown_short_and_on_one_line() -> None:
    with pytest.raises(LockError) as info:
        lockfile.parse('{"lazyfs_lock": "' + "x\\n" * 10_000 + '"}', "m.lock")
    assert len(str(info.value)) < 150 and "\n" not in str(info.value)


def test_a_lock_of_100000_files_is_far_below_the_size_a_lock_may_have(tmp_path) -> None:
    """LOCK_MAX refuses a wrong file (a checkpoint) unread; a real lock of a big checkpoint must load."""
    from lazyfs.userfile import LOCK_MAX

    entries = tuple(Entry("models", f"ckpt/step-{i // 1000:07d}/layer.{i:06d}.attention.weight.safetensors",
                          123_456_789, "e" * 32, "v" * 32, T, Expectation("CRC64NVME", "AAAAAAAAAAA="))
                    for i in range(100_000))
    path = tmp_path / "big.lock.json"
    path.write_text(lockfile.dumps(lockfile.make([Folder("models", "ckpt/", entries)], [], "lazyfs test")))
    assert path.stat().st_size * 6 < LOCK_MAX
    assert lockfile.read(path).files == 100_000
