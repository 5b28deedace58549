"""Object keys to paths, and immutable snapshots of the resulting tree.

Pure logic: no I/O, no trio, no lazyfs module but errors and wording.  An object with key K
appears at MOUNTPOINT/K, so a file's path *is* its key.  Keys that could not be
a safe relative path are rejected here, once, before anything touches a disk.

A `Tree` is built from one complete listing and never changes afterwards;
a refresh builds a new one and swaps it in with one assignment, so a reader
never sees half of one listing and half of the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

from lazyfs.errors import UnsafeKey
from lazyfs.wording import quoted

NAME_MAX = 255
RESERVED_NAME = ".lazyfs"
# Legal in Linux names, but they break terminals, logs and shell scripts: C0
# and DEL, and C1 (U+0080-U+009F, Unicode's other control characters: NEL
# ends a line for str.splitlines and journald viewers, CSI starts a terminal
# escape).  No real name holds one (a C1 control in a key is text decoded
# with the wrong charset), so it is skipped as the C0 ones are.  U+2028 and
# U+2029 are not controls (Zl, Zp): served, and escaped where they are logged.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class Version(NamedTuple):
    """One version of one object: what a download, a lock, a partial file and a
    file inode stand for.  (ETag, size) name the bytes; the key where they live."""

    bucket: str
    key: str
    etag: str
    size: int


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """One object version as listed: the unit of identity in lazyfs.

    Two objects with the same (etag, size) hold the same bytes as far as S3
    can tell; `mtime_ns` is the object's Last-Modified.
    """

    bucket: str
    key: str
    size: int
    etag: str
    mtime_ns: int
    # The additional checksum's algorithm when the object has one (e.g. "CRC32").
    checksum_algorithm: str = ""
    # Set only for a version a lock pins in a bucket that keeps versions
    # (lockfile.py): fetched by this id, so an overwrite changes nothing.
    version_id: str = ""

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def version(self) -> Version:
        return Version(self.bucket, self.key, self.etag, self.size)

    @property
    def multipart(self) -> bool:
        """A multipart ETag ("<md5>-<parts>") is not the MD5 of the content."""
        return "-" in self.etag

    def same_bytes(self, other: RemoteObject) -> bool:
        """Do both name the same content (wherever it lives)?"""
        return (self.bucket, self.etag, self.size) == (other.bucket, other.etag, other.size)


def key_parts(key: str) -> tuple[str, ...]:
    """Split a file key into path components, or raise UnsafeKey saying why."""
    if not key:
        raise UnsafeKey("empty key")
    if key.startswith("/"):
        raise UnsafeKey("leading '/'")
    parts = tuple(key.split("/"))
    for part in parts:
        check_name(part)
    if parts[0] == RESERVED_NAME:
        raise UnsafeKey(f"'{RESERVED_NAME}' is reserved by lazyfs")
    return parts


def check_name(part: str) -> None:
    if part == "":
        raise UnsafeKey("empty path component ('//' or trailing '/')")
    if part in (".", ".."):
        raise UnsafeKey(f"'{part}' path component")
    try:
        raw = part.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeKey("name is not valid UTF-8") from None
    if len(raw) > NAME_MAX:
        raise UnsafeKey(f"path component longer than {NAME_MAX} bytes")
    if _CONTROL.search(part):
        raise UnsafeKey("control character in name")


class DirNode:
    """A directory of one snapshot: its children by name, and sorted names for
    readdir (so offsets stay stable for the life of the snapshot)."""

    __slots__ = ("children", "mtime_ns", "names", "nsubdirs", "path")

    def __init__(self, path: str, children: dict[str, Node], mtime_ns: int,
                 names: tuple[str, ...] | None = None) -> None:
        self.path = path
        self.children = children
        self.names = names if names is not None else tuple(sorted(children))
        self.mtime_ns = mtime_ns
        self.nsubdirs = sum(1 for c in children.values() if isinstance(c, DirNode))

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"DirNode({self.path!r}, {len(self.children)} entries)"


Node = DirNode | RemoteObject


# What kind of skip: a key that cannot be a path here (UNSAFE), or the body
# of a folder marker (MARKER_BODY: nothing is wrong with the key, its folder
# is shown).
UNSAFE, MARKER_BODY = "unsafe", "marker body"
# The largest size a listing may give a file (S3's largest object is far below).
MAX_SIZE = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Skipped:
    key: str
    reason: str
    kind: str = UNSAFE


class Tree:
    """An immutable snapshot of everything one listing presents."""

    __slots__ = ("objects", "root", "skipped", "total_bytes")

    def __init__(self, root: DirNode, objects: int, total_bytes: int,
                 skipped: tuple[Skipped, ...]) -> None:
        self.root = root
        self.objects = objects
        self.total_bytes = total_bytes
        self.skipped = skipped

    def find(self, path: str) -> Node | None:
        """The node at a mount-relative path ("" is the root)."""
        node: Node = self.root
        if not path:
            return node
        for part in path.split("/"):
            if not isinstance(node, DirNode):
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def replaced(self, key: str, new: RemoteObject | None) -> Tree:
        """This snapshot with the file at `key` replaced by `new`, removed
        (None), or added into its folder (a name a 404 took, found again),
        sharing every folder off the path to it; itself if its folder is not
        there, or a folder stands at `key`, or there is nothing to remove.
        O(path depth x folder size): build it in a worker thread."""
        parts = key.split("/")
        chain = [self.root]
        for part in parts[:-1]:
            child = chain[-1].children.get(part)
            if not isinstance(child, DirNode):
                return self
            chain.append(child)
        old = chain[-1].children.get(parts[-1])
        if isinstance(old, DirNode) or (old is None and new is None):
            return self
        folder = chain[-1]
        children = dict(folder.children)
        if new is None:
            del children[parts[-1]]
            node = DirNode(folder.path, children, folder.mtime_ns)
        else:
            children[parts[-1]] = new
            node = DirNode(folder.path, children, folder.mtime_ns, folder.names if old is not None else None)
        for depth in range(len(chain) - 2, -1, -1):
            parent = chain[depth]
            siblings = dict(parent.children)
            siblings[parts[depth]] = node
            node = DirNode(parent.path, siblings, parent.mtime_ns, parent.names)
        objects = self.objects - (new is None) + (old is None)
        return Tree(node, objects, self.total_bytes - (old.size if old else 0) + (new.size if new else 0), self.skipped)

    def files(self) -> Iterator[RemoteObject]:
        stack = [self.root]
        while stack:
            d = stack.pop()
            for name in d.names:
                child = d.children[name]
                if isinstance(child, DirNode):
                    stack.append(child)
                else:
                    yield child


def build_tree(objects: Iterable[RemoteObject], folders: Iterable[str] = (),
               mtime_ns: int = 0) -> Tree:
    """Build a snapshot from listed objects.  `folders` are directory paths that
    exist even when empty (the configured prefixes); `mtime_ns` dates folders
    with no files under them.

    Skipped, with the reason recorded: unsafe keys, a key that is both a file
    and a folder (the folder wins: it holds more), a second object at the
    same path from another bucket (the first one listed wins), and the body of
    a folder marker that has one (its folder is kept).
    """
    root: dict[str, object] = {}
    skipped: list[Skipped] = []

    def subdir(parts: tuple[str, ...] | list[str]) -> dict[str, object] | None:
        d = root
        for _i, part in enumerate(parts):
            child = d.get(part)
            if isinstance(child, RemoteObject):
                skipped.append(Skipped(child.key, "is both a file and a folder; the folder is kept"))
                child = None
            if child is None:
                child = {}
                d[part] = child
            d = child  # type: ignore[assignment]
        return d

    for folder in folders:
        if folder.strip("/"):
            subdir(folder.strip("/").split("/"))
    for obj in objects:
        key = obj.key
        if not 0 <= obj.size <= MAX_SIZE:  # no file has it (st_size is a signed 64-bit number)
            skipped.append(Skipped(key, f"its listed size {obj.size} is not possible"))
            continue
        is_marker = key.endswith("/")
        try:
            parts = key_parts(key[:-1] if is_marker else key)
        except UnsafeKey as e:
            skipped.append(Skipped(key, str(e)))
            continue
        if is_marker:
            # "folder/" placeholder objects (console-created folders) make the
            # folder exist; they are not files.
            if obj.size:
                skipped.append(Skipped(key, f"is a folder marker with a body ({obj.size} bytes): the folder "
                                            "is shown, the body is not", MARKER_BODY))
            subdir(parts)
            continue
        parent = subdir(parts[:-1])
        assert parent is not None
        existing = parent.get(parts[-1])
        if isinstance(existing, dict):
            skipped.append(Skipped(key, "is both a file and a folder; the folder is kept"))
        elif isinstance(existing, RemoteObject):
            skipped.append(Skipped(key, f"same path as {quoted(existing.uri)}, which is kept"))
        else:
            parent[parts[-1]] = obj

    counts = [0, 0]

    def freeze(path: str, d: dict[str, object]) -> DirNode:
        children: dict[str, Node] = {}
        newest = 0
        for name, value in d.items():
            child_path = f"{path}/{name}" if path else name
            if isinstance(value, dict):
                node: Node = freeze(child_path, value)
                newest = max(newest, node.mtime_ns)
            else:
                assert isinstance(value, RemoteObject)
                node = value
                counts[0] += 1
                counts[1] += value.size
                newest = max(newest, value.mtime_ns)
            children[name] = node
        return DirNode(path, children, newest or mtime_ns)

    tree_root = freeze("", root)
    return Tree(tree_root, counts[0], counts[1], tuple(skipped))


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


@dataclass(frozen=True)
class Diff:
    added: tuple[RemoteObject, ...] = ()
    removed: tuple[RemoteObject, ...] = ()
    changed: tuple[tuple[RemoteObject, RemoteObject], ...] = ()
    # Folder paths that are folders in one snapshot only (appeared, vanished,
    # or a file's path turned folder or back): their names changed meaning.
    # Every other folder on the way to an added or removed file is the same
    # folder before and after, and its name must stay cached (kernelcache.py).
    folders: tuple[str, ...] = ()
    # Folders in both snapshots whose date changed: a folder is dated by the
    # newest file anywhere below it, so a file added deep down redates every
    # folder above it, not only the one holding it (kernelcache.py).
    redated: tuple[str, ...] = ()
    # Files whose version stayed (same ETag and size: the same inode, the
    # same pages) but whose listing entry changed: the same bytes uploaded
    # again have a new Last-Modified, which `stat` must show (kernelcache.py).
    # The new entries.  Also those that differ only in what a saved listing
    # does not keep (the checksum algorithm): going live from it, the inodes
    # that stood for the saved entries stand for the live ones.
    retouched: tuple[RemoteObject, ...] = ()
    # How many of `retouched` have a new date: what a user sees changed.
    new_dates: int = 0

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.folders or self.redated or self.retouched)


def diff_trees(old: Tree, new: Tree) -> Diff:
    """What changed between two snapshots, for kernel cache invalidation."""
    before = {o.key: o for o in old.files()}
    after = {o.key: o for o in new.files()}
    added = tuple(o for k, o in after.items() if k not in before)
    removed = tuple(o for k, o in before.items() if k not in after)
    changed = tuple((before[k], o) for k, o in after.items()
                    if k in before and not before[k].same_bytes(o))
    # A file uploaded again with the same bytes is no change, but its new Last-Modified redates it and its folders.
    retouched = tuple(o for k, o in after.items() if k in before and before[k] != o and before[k].same_bytes(o))
    touched = added + removed + tuple(o for _, o in changed) + retouched
    new_dates = sum(1 for o in retouched if before[o.key].mtime_ns != o.mtime_ns)
    return Diff(added, removed, changed, _folders_changed(old, new, added + removed),
                _folders_redated(old, new, touched), retouched, new_dates)


def _folders_changed(old: Tree, new: Tree, moved: tuple[RemoteObject, ...]) -> tuple[str, ...]:
    """The folders above added or removed files that are folders in only one
    of the snapshots; each path looked at once."""
    seen: set[str] = set()
    out: list[str] = []
    for obj in moved:
        parts = obj.key.split("/")
        for depth in range(1, len(parts)):
            path = "/".join(parts[:depth])
            if path in seen:
                continue
            seen.add(path)
            if isinstance(old.find(path), DirNode) != isinstance(new.find(path), DirNode):
                out.append(path)
    return tuple(sorted(out))


def _folders_redated(old: Tree, new: Tree, touched: tuple[RemoteObject, ...]) -> tuple[str, ...]:
    """The folders above added, removed or changed files (the root too) that
    are folders in both snapshots with different dates; each path looked at once."""
    seen: set[str] = set()
    out: list[str] = []
    for obj in touched:
        parts = obj.key.split("/")
        for depth in range(len(parts)):
            path = "/".join(parts[:depth])
            if path in seen:
                continue
            seen.add(path)
            before, after = old.find(path), new.find(path)
            if isinstance(before, DirNode) and isinstance(after, DirNode) and before.mtime_ns != after.mtime_ns:
                out.append(path)
    return tuple(sorted(out))
