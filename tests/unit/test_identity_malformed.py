"""A malformed identity record is no record, never an exception: a user may
`setfattr` any bytes on a store file, and a corrupt store (or its sidecar
files) holds anything.  The copy is then judged as an unrecorded one (by
size), as a record that no longer describes its file is."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from lazyfs.filestate import FileState
from lazyfs.identity import IDENTITY_XATTR, Identity
from lazyfs.namespace import RemoteObject
from lazyfs.store import Store
from support.storefiles import current_state
from support.storefiles import publish as download

GOOD = {"v": 1, "bucket": "bkt", "key": "m/w.bin", "etag": "e", "size": 5, "mtime_ns": 1_700_000_000 * 10**9,
        "origin": "fetch"}
DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
# Deeper than the parser's recursion limit (1,000), small enough for ext4's one block of xattrs.
NESTED = b"[" * 1500 + b"]" * 1500

MALFORMED: dict[str, bytes] = {
    "nested 100,000 deep": DEEP,
    "an object nested 100,000 deep": DEEP_OBJECT,
    "a member nested 100,000 deep": b'{"v":1,"bucket":' + DEEP + b"}",
    "not JSON": b"\x00\xff garbage",
    "not UTF-8": b'{"v":1,"key":"\xff"}',
    "a list": b"[1, 2, 3]",
    "a number": b"42",
    "null": b"null",
    "empty": b"",
    "no key": json.dumps({k: v for k, v in GOOD.items() if k != "key"}).encode(),
    "size as text": json.dumps({**GOOD, "size": "5"}).encode(),
    "size a float": json.dumps({**GOOD, "size": 5.0}).encode(),
    "size a bool": json.dumps({**GOOD, "size": True}).encode(),
    "size negative": json.dumps({**GOOD, "size": -5}).encode(),
    "size past 64 bits": json.dumps({**GOOD, "size": 1 << 64}).encode(),
    "size of 4,000 digits": json.dumps({**GOOD, "size": int("9" * 4000)}).encode(),
    "size of 5,000 digits": b'{"v":1,"size":' + b"9" * 5000 + b"}",  # past Python's int parsing limit
    "size infinite": b'{"v":1,"bucket":"b","key":"k","etag":"e","size":1e400,"mtime_ns":0}',
    "size NaN": b'{"v":1,"bucket":"b","key":"k","etag":"e","size":NaN,"mtime_ns":0}',
    "mtime huge": json.dumps({**GOOD, "mtime_ns": 10**30}).encode(),
    "file mtime a list": json.dumps({**GOOD, "file_mtime_ns": [1]}).encode(),
    "key a number": json.dumps({**GOOD, "key": 7}).encode(),
    "bucket an object": json.dumps({**GOOD, "bucket": {"a": 1}}).encode(),
    "etag null": json.dumps({**GOOD, "etag": None}).encode(),
    "origin a list": json.dumps({**GOOD, "origin": ["bake"]}).encode(),
    "verified a number": json.dumps({**GOOD, "verified": 1}).encode(),
    "another version of the format": json.dumps({**GOOD, "v": 2}).encode(),
}


def test_a_good_record_decodes() -> None:
    ident = Identity.decode(json.dumps(GOOD).encode())
    assert ident == Identity("bkt", "m/w.bin", "e", 5, 1_700_000_000 * 10**9, "fetch")
    assert Identity.decode(ident.encode()) == ident
    with_times = Identity("b", "k", "e", 0, 0, "bake", "MD5", -1)  # a file time before 1970 is still a time
    assert Identity.decode(with_times.encode()) == with_times


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_record_is_no_record(raw: bytes) -> None:
    assert Identity.decode(raw) is None


def obj(data: bytes) -> RemoteObject:
    return RemoteObject("bkt", "m/w.bin", len(data), hashlib.md5(data).hexdigest(), 1_700_000_000 * 10**9)


@pytest.mark.parametrize("raw", [NESTED, b'{"v":1,"bucket":' + NESTED + b"}",
                                 json.dumps({**GOOD, "size": 1 << 64}).encode(),
                                 b'{"v":1,"bucket":"b","key":"k","etag":"e","size":1e400,"mtime_ns":0}'],
                         ids=["nested", "nested member", "past 64 bits", "infinite"])
def test_a_store_file_with_a_hostile_xattr_is_an_unrecorded_copy(tmp_path: Path, raw: bytes) -> None:
    """`setfattr -n user.lazyfs.identity -v ...` on a store file: judged by size, as a copy with no record."""
    v1 = obj(b"weights-1")
    store = Store.open(str(tmp_path / "s"), create=True)
    try:
        download(store, v1, b"weights-1")
        path = tmp_path / "s" / "m" / "w.bin"
        try:
            os.setxattr(path, IDENTITY_XATTR, raw)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.E2BIG):  # no room for it in this filesystem's attributes
                pytest.skip(f"the store's filesystem cannot hold a {len(raw)}-byte xattr")
            raise
        assert current_state(store, v1) is FileState.PREBAKED
    finally:
        store.close()


@pytest.fixture
def no_user_xattrs(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    for name in ("setxattr", "getxattr", "listxattr", "removexattr"):
        monkeypatch.setattr(os, name, refused)


@pytest.mark.parametrize("raw", [DEEP, b"[1, 2, 3]", b"null", json.dumps({**GOOD, "size": 1e300}).encode()],
                         ids=["nested", "a list", "null", "a float"])
def test_a_hostile_sidecar_record_is_no_record(tmp_path: Path, no_user_xattrs: None, raw: bytes) -> None:
    """A store that keeps its records in `.lazyfs/identities/<inode>` files."""
    v1 = obj(b"weights-1")
    store = Store.open(str(tmp_path / "s"), create=True)
    try:
        download(store, v1, b"weights-1")
        [sidecar] = (tmp_path / "s" / ".lazyfs" / "identities").iterdir()
        os.chmod(sidecar, 0o600)
        sidecar.write_bytes(raw)
        assert current_state(store, v1) is FileState.PREBAKED
    finally:
        store.close()
