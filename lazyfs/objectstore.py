"""What the rest of lazyfs needs from an object store, without boto3: the
interface remote.Remote implements (and the tests' in-memory fake), and the
plain results it returns.  Importing this costs nothing, so the engine and
the catalog start without loading botocore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lazyfs.namespace import RemoteObject
from lazyfs.verify import Part
from lazyfs.wording import quoted

if TYPE_CHECKING:
    from lazyfs.modeljson import Source


def broke_off(obj: RemoteObject, start: int, end: int, written: int, why: str) -> str:
    """What a ranged GET of [start, end) that broke off had put in the file.
    Only bytes handed over in whole pieces (boto3's reads) or parts (awscrt's)
    are known: a piece cut short was received in part, by how much no client
    says, so no count of received bytes is given."""
    span = f"bytes {start}-{end - 1}"
    if written:
        return f"{quoted(obj.uri)}: transfer broke off with {written} of {span} written ({why})"
    return f"{quoted(obj.uri)}: transfer broke off before any of {span} was written ({why})"


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What a GET's headers say about verification: whether the ETag can be an
    MD5 (not with SSE-KMS or SSE-C), and the full-object checksum if given."""

    etag_is_md5: bool
    checksum: tuple[str, str, str] | None


@dataclass(frozen=True, slots=True)
class ListPage:
    """One listing request's answer: objects in key order, the common prefixes
    ("folders", ending in "/") of a listing by delimiter, and the token that
    asks for the next page (None on the last page)."""

    objects: list[RemoteObject]
    folders: list[str]
    next_token: str | None = None

    @property
    def truncated(self) -> bool:
        return self.next_token is not None


@dataclass(frozen=True, slots=True)
class HeadInfo:
    """What a HEAD tells beyond the listing."""

    obj: RemoteObject
    # (algorithm, base64 value, "FULL_OBJECT" or "COMPOSITE") when the object
    # has an additional checksum.
    checksum: tuple[str, str, str] | None
    # SSE-KMS, DSSE and SSE-C objects have ETags that are not MD5s.
    etag_is_md5: bool
    # The current version's id in a bucket that keeps versions ("" if none).
    version_id: str = ""


class Body(Protocol):
    """The body of one ranged GET.  `read` raises RemoteUnavailable when the
    transfer breaks off or stalls; an empty result means the end."""

    meta: ResponseMeta

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


class ObjectStore(Protocol):
    """Blocking, thread-safe: call from worker threads.  Failures are
    lazyfs.errors.RemoteError subclasses."""

    endpoint: str  # as lazyfs shows it: its password masked (redact.url)

    def list_page(self, bucket: str, prefix: str, *, delimiter: bool = False, start_after: str = "",
                  token: str | None = None, max_keys: int = 1000) -> ListPage:
        """One request: up to `max_keys` entries under `prefix` in key order,
        those after `start_after` (any string, not only a key), or the page
        `token` names; by delimiter, deeper keys roll up into folders."""

    def list_some(self, bucket: str, prefix: str, max_keys: int = 1000) -> tuple[list[RemoteObject], bool]:
        """The first `max_keys` objects under `prefix`, and whether there are more."""

    def probe(self, source: Source) -> ListPage:
        """One request proving the bucket exists and the folder lists: its first page."""

    def head(self, bucket: str, key: str, etag: str | None = None, version_id: str = "") -> HeadInfo:
        """Current metadata of one object; with `etag`, only if still that version;
        with `version_id`, of that version (a pinned mount asks for "null")."""

    def part(self, obj: RemoteObject, number: int) -> Part | None:
        """What the store says of part `number` of a multipart object (None:
        nothing); of the version `obj.version_id` names, when it names one."""

    def versioning(self, bucket: str) -> str | None:
        """The bucket's versioning: "Enabled", "Suspended", "" (never turned
        on), or None when the store will not say (access denied, a store
        without the request)."""

    def get_range(self, obj: RemoteObject, start: int, end: int) -> Body:
        """Bytes [start, end) of exactly the version `obj` names: its ETag
        (ObjectChanged if replaced), and its version id when it has one
        (ObjectNotFound if that version is gone)."""
