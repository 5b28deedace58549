"""Lock files: exactly which bytes a deployment serves (issue 14).

A lock names, for every object of the configured folders, the version it
pins: key, size, ETag, version id (when the bucket keeps versions),
Last-Modified, and what its bytes are checked against (the strongest check
the object store offered when the lock was made, as a verify.Expectation).
It also records the model.json files it was made from and a digest of the
whole document, so a lock that was edited, truncated or corrupted after
`lazyfs lock` wrote it is refused instead of half-applied.

Pure: no I/O beyond reading the file named, no trio, no boto3.  Every
problem is a LockError (a ConfigError: one line, exit code 2).

The digest is a SHA-256 of the document's canonical JSON (sorted keys, no
whitespace, UTF-8) without the "digest" member.  It catches accidents (an
edit, a truncated copy, a merge gone wrong), not an attacker who can write
the file: whoever can change a lock can compute its digest too.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from lazyfs.errors import ConfigError, UnsafeKey
from lazyfs.modeljson import Source, check_bucket, parse_source
from lazyfs.namespace import RemoteObject, key_parts
from lazyfs.userfile import LOCK_MAX, BadJson, parse_json, read_text
from lazyfs.verify import Expectation
from lazyfs.wording import quoted

FORMAT = 1
CHECKSUMS = ("CRC64NVME", "CRC32C", "CRC32", "SHA256", "SHA1")  # full-object additional checksums
ETAG_CHECKS = ("MD5", "MD5-multipart")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ISO = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)Z$")
_TOKEN = re.compile(r'^[!#-\[\]-~]{0,1024}$')  # visible ASCII but '"' and '\\'


class LockError(ConfigError):
    """A lock file that cannot be used as it is (exit code 2)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One pinned object version."""

    bucket: str
    key: str
    size: int
    etag: str
    version_id: str  # "" when the bucket keeps no versions (pinned by ETag alone)
    mtime_ns: int  # Last-Modified, whole seconds
    check: Expectation | None  # None: the object store offered nothing to check the bytes against

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def obj(self) -> RemoteObject:
        """The object as the engine sees it: the locked version, by version id when there is one."""
        algorithm = self.check.algorithm if self.check is not None and self.check.algorithm in CHECKSUMS else ""
        return RemoteObject(self.bucket, self.key, self.size, self.etag, self.mtime_ns, algorithm, self.version_id)

    def describe(self) -> str:
        """The identity in a log line: ETag, size, version id."""
        vid = f", version {self.version_id}" if self.version_id else ""
        return f"ETag {self.etag}, {self.size} bytes{vid}"


@dataclass(frozen=True, slots=True)
class Folder:
    bucket: str
    prefix: str
    entries: tuple[Entry, ...]

    @property
    def source(self) -> Source:
        return Source(self.bucket, self.prefix)


@dataclass(frozen=True, slots=True)
class ConfigRef:
    """A model.json a lock was made from, as it was then."""

    path: str
    download_files_from: str
    download_files_to: str | None = None


@dataclass(frozen=True)
class Lock:
    folders: tuple[Folder, ...]
    configs: tuple[ConfigRef, ...]
    created: str
    generator: str
    digest: str
    path: str = ""  # the file it was read from ("" for a lock made in this process)

    @property
    def sources(self) -> tuple[Source, ...]:
        return tuple(f.source for f in self.folders)

    def entries(self) -> Iterator[Entry]:
        for folder in self.folders:
            yield from folder.entries

    def objects(self) -> list[RemoteObject]:
        return [e.obj() for e in self.entries()]

    @property
    def files(self) -> int:
        return sum(len(f.entries) for f in self.folders)

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.entries())

    @property
    def short_digest(self) -> str:
        return self.digest[:19]  # "sha256:" and 12 hex digits, as in logs and the ready line

    @property
    def versioned(self) -> bool:
        """Does every file have a version id (so no overwrite can take it away)?"""
        return all(e.version_id for e in self.entries())

    def where(self) -> str:
        return f"lock {self.path}" if self.path else "the lock"


# -- writing -------------------------------------------------------------------------------------


def make(folders: Sequence[Folder], configs: Sequence[ConfigRef], generator: str,
         created: str | None = None) -> Lock:
    """A lock of `folders` (their entries in key order), with its digest."""
    folders = tuple(Folder(f.bucket, f.prefix, tuple(sorted(f.entries, key=lambda e: e.key))) for f in folders)
    created = created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lock = Lock(folders, tuple(configs), created, generator, "")
    return Lock(lock.folders, lock.configs, created, generator, digest_of(_document(lock)))


def dumps(lock: Lock) -> str:
    """The lock file's text: one object a line, so a review of a lock change
    (or `git diff`) shows one line per changed file."""
    doc = _document(lock)
    doc["digest"] = lock.digest
    head = {k: v for k, v in doc.items() if k not in ("folders", "digest")}
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    lines.append('  "folders": [')
    for i, folder in enumerate(doc["folders"]):
        lines.append(f'    {{"bucket": {json.dumps(folder["bucket"])}, "prefix": {json.dumps(folder["prefix"])}, '
                     '"objects": [')
        rows = [f"      {json.dumps(o, ensure_ascii=False)}" for o in folder["objects"]]
        lines.append(",\n".join(rows))
        lines.append("    ]}" + ("," if i + 1 < len(doc["folders"]) else ""))
    lines.append("  ],")
    lines.append(f'  "digest": {json.dumps(lock.digest)}')
    lines.append("}")
    return "\n".join(line for line in lines if line) + "\n"


def digest_of(doc: Mapping[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _document(lock: Lock) -> dict[str, Any]:
    return {
        "lazyfs_lock": FORMAT,
        "generator": lock.generator,
        "created": lock.created,
        "config": [{"path": c.path, "download_files_from": c.download_files_from,
                    "download_files_to": c.download_files_to} for c in lock.configs],
        "folders": [{"bucket": f.bucket, "prefix": f.prefix, "objects": [_entry_doc(e) for e in f.entries]}
                    for f in lock.folders],
    }


def _entry_doc(e: Entry) -> dict[str, Any]:
    check: dict[str, Any] | None = None
    if e.check is not None:
        check = {"algorithm": e.check.algorithm, "value": e.check.value}
        if e.check.algorithm == "MD5-multipart":
            check.update(part_sizes=list(e.check.part_sizes), parts_confirmed=e.check.exact)
    return {"key": e.key, "size": e.size, "etag": e.etag, "version_id": e.version_id or None,
            "last_modified": iso(e.mtime_ns), "checksum": check}


def iso(mtime_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime_ns // 1_000_000_000))


# -- reading -------------------------------------------------------------------------------------


def read(path: Path) -> Lock:
    return parse(read_text(path, f"lock {path}", "lock file", LOCK_MAX, LockError), str(path))


def parse(text: str, path: str) -> Lock:
    """A lock from its file's text, checked whole: JSON, format, digest, then
    every field.  LockError (one line naming the file) on any problem."""
    where = f"lock {path}"
    try:
        doc = parse_json(text)
    except json.JSONDecodeError as e:
        raise LockError(f"{where}: not a complete lock file: invalid JSON at line {e.lineno}, column {e.colno} "
                        f"({e.msg}); truncated, or not written by lazyfs lock?") from None
    except BadJson as e:
        raise LockError(f"{where}: {e}; not written by lazyfs lock?") from None
    if not isinstance(doc, dict) or "lazyfs_lock" not in doc:
        raise LockError(f"{where}: not a lazyfs lock file (no \"lazyfs_lock\" member)")
    if doc["lazyfs_lock"] != FORMAT:
        raise LockError(f"{where}: lock format {_shown(doc['lazyfs_lock'])} is not one this lazyfs reads ({FORMAT})")
    digest = doc.get("digest")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise LockError(f"{where}: no valid \"digest\" (sha256:<64 hex digits>)")
    if digest_of(doc) != digest:
        raise LockError(f"{where}: digest mismatch: the file was changed after lazyfs lock wrote it "
                        "(edited, truncated or corrupted); make a new lock with lazyfs lock")
    return _checked(doc, where, path)


def _checked(doc: dict[str, Any], where: str, path: str) -> Lock:
    f = _Fields(where)
    configs = tuple(ConfigRef(f.text(c, "path", "config[]"), f.text(c, "download_files_from", "config[]"),
                              f.opt_text(c, "download_files_to", "config[]"))
                    for c in f.items(doc, "config", "the lock", dicts=True))
    folders_doc = f.items(doc, "folders", "the lock", dicts=True)
    if not folders_doc:
        raise LockError(f"{where}: names no folder")
    folders, seen, seen_keys = [], set(), set[str]()
    for i, fd in enumerate(folders_doc):
        what = f"folders[{i}]"
        bucket, prefix = f.text(fd, "bucket", what), f.text(fd, "prefix", what)
        try:
            check_bucket(bucket, where)
            source = parse_source(f"s3://{bucket}/{prefix}", None, where)
        except ConfigError as e:
            raise LockError(str(e)) from None
        if source.prefix != prefix or (bucket, prefix) in seen:
            raise LockError(f"{where}: {what} is not a normalized folder ({quoted(prefix)}), or is repeated")
        seen.add((bucket, prefix))
        entries = [_entry(f, od, bucket, prefix, f"{what}.objects[{j}]")
                   for j, od in enumerate(f.items(fd, "objects", what, dicts=True))]
        keys = {e.key for e in entries}
        if len(keys) != len(entries) or keys & seen_keys:
            raise LockError(f"{where}: {what} names a key twice (a mount shows one file per path)")
        seen_keys |= keys
        folders.append(Folder(bucket, prefix, tuple(entries)))
    return Lock(tuple(folders), configs, f.text(doc, "created", "the lock"), f.text(doc, "generator", "the lock"),
                doc["digest"], path)


def _entry(f: _Fields, d: dict[str, Any], bucket: str, prefix: str, what: str) -> Entry:
    key = f.text(d, "key", what)
    if not key.startswith(prefix):
        raise LockError(f"{f.where}: {what}: key {quoted(key)} is not under its folder s3://{bucket}/{prefix}")
    try:
        key_parts(key)
    except UnsafeKey as e:
        raise LockError(f"{f.where}: {what}: key {quoted(key)} cannot be a path ({e})") from None
    size = f.whole(d, "size", what)
    check = _check(f, d.get("checksum"), size, f"{what}.checksum")
    etag, version_id = f.text(d, "etag", what), f.opt_text(d, "version_id", what) or ""
    if not _TOKEN.match(etag) or not _TOKEN.match(version_id):  # they go into request headers and URLs
        raise LockError(f"{f.where}: {what}: etag and version_id must be printable ASCII without spaces or quotes")
    return Entry(bucket, key, size, etag, version_id, _parse_iso(f, f.text(d, "last_modified", what), what), check)


def _check(f: _Fields, d: Any, size: int, what: str) -> Expectation | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise LockError(f"{f.where}: {what} must be an object or null")
    algorithm, value = f.text(d, "algorithm", what), f.text(d, "value", what)
    if algorithm not in CHECKSUMS + ETAG_CHECKS:
        raise LockError(f"{f.where}: {what}: unknown algorithm {quoted(algorithm)}")
    if algorithm != "MD5-multipart":
        return Expectation(algorithm, value)
    sizes = d.get("part_sizes")
    if not isinstance(sizes, list) or not sizes or not all(_is_int(n) and n > 0 for n in sizes) \
            or sum(sizes) != size:
        raise LockError(f"{f.where}: {what}: part_sizes must be positive whole numbers adding up to the size")
    exact = d.get("parts_confirmed")
    if not isinstance(exact, bool):
        raise LockError(f"{f.where}: {what}: parts_confirmed must be true or false")
    return Expectation(algorithm, value, tuple(sizes), exact)


def _parse_iso(f: _Fields, text: str, what: str) -> int:
    m = _ISO.match(text)
    if not m:
        raise LockError(f"{f.where}: {what}: last_modified {quoted(text)} is not a UTC time like 2026-01-31T12:00:00Z")
    try:
        ns = calendar.timegm(tuple(int(g) for g in m.groups())) * 1_000_000_000
        if iso(ns) == text:
            return ns
    except (ValueError, OverflowError):
        pass
    raise LockError(f"{f.where}: {what}: last_modified {quoted(text)} is not a valid time")


def _shown(value: Any) -> str:
    """A value of any JSON type from the file, in a message: one short line."""
    text = quoted(value) if isinstance(value, str) else str(value) if isinstance(value, (int, float)) else \
        "of another kind"
    return text if len(text) <= 40 else text[:36] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Fields:
    """Typed access to a lock's members, each problem one line naming the member."""

    def __init__(self, where: str) -> None:
        self.where = where

    def _get(self, d: dict[str, Any], name: str, what: str) -> Any:
        if name not in d:
            raise LockError(f"{self.where}: {what} has no \"{name}\"")
        return d[name]

    def text(self, d: dict[str, Any], name: str, what: str) -> str:
        value = self._get(d, name, what)
        if not isinstance(value, str):
            raise LockError(f"{self.where}: {what}: \"{name}\" must be a string")
        return value

    def opt_text(self, d: dict[str, Any], name: str, what: str) -> str | None:
        value = d.get(name)
        if value is not None and not isinstance(value, str):
            raise LockError(f"{self.where}: {what}: \"{name}\" must be a string or null")
        return value

    def whole(self, d: dict[str, Any], name: str, what: str) -> int:
        value = self._get(d, name, what)
        if not _is_int(value) or value < 0:
            raise LockError(f"{self.where}: {what}: \"{name}\" must be a whole number")
        return int(value)

    def items(self, d: dict[str, Any], name: str, what: str, dicts: bool = False) -> list[Any]:
        value = self._get(d, name, what)
        if not isinstance(value, list) or (dicts and not all(isinstance(v, dict) for v in value)):
            raise LockError(f"{self.where}: {what}: \"{name}\" must be a list" + (" of objects" if dicts else ""))
        return value


def check_sources(lock: Lock, sources: Sequence[Source]) -> None:
    """Refuse a lock made for other folders than the configuration serves."""
    pinned = {(s.bucket, s.prefix) for s in lock.sources}
    served = {(s.bucket, s.prefix) for s in sources}
    if pinned == served:
        return
    buckets = {b for b, _ in pinned} != {b for b, _ in served}
    what = "another bucket" if buckets else "other folders"
    raise LockError(f"{lock.where()} is for {what}: it pins {', '.join(sorted(s.uri for s in lock.sources))} "
                    f"but the configuration serves {', '.join(sorted(s.uri for s in sources))}; "
                    "make a lock of this configuration with lazyfs lock")
