"""The object store client: with awssession.py (its session and credentials),
the only module that imports boto3 or botocore.

Blocking by design (boto3 is): callers run these methods in worker threads.
One client is built per process and shared (boto3 clients are thread-safe,
sessions are not).  Every botocore failure leaves this module as one of the
`lazyfs.errors` types, so nothing above it needs to know botocore.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import botocore.config
import botocore.configprovider
import botocore.exceptions
import botocore.handlers
import botocore.retries.quota
import botocore.retries.standard
import botocore.session
import urllib3.exceptions

from lazyfs import answers, awssession, botoretries, errors, exhausted, listanswers, listxml, objectheaders, redact
from lazyfs.clientretries import ClientAttempts, calling
from lazyfs.config import AddressingStyle, RemoteConfig, Source, endpoint
from lazyfs.crtcreds import BotocoreCredentials, CredentialsUnavailable, wait_for_credentials
from lazyfs.errors import DENIED_CODES as _DENIED  # the CRT's refusals are the same (crt.py)
from lazyfs.errors import AccessDenied, BucketNotFound, ObjectChanged, ObjectNotFound, RemoteError, RemoteUnavailable
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import HeadInfo, ListPage, ResponseMeta, broke_off
from lazyfs.stats import TIMINGS
from lazyfs.verify import Part
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

_OPS = {"list_objects_v2": "LIST", "get_object": "GET", "head_object": "HEAD", "ListObjectsV2": "LIST",
        "GetObject": "GET", "HeadObject": "HEAD"}

_NOT_FOUND = {"NoSuchKey", "NoSuchVersion", "404", "NotFound"}
_CHANGED = {"PreconditionFailed", "412"}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "TooManyRequests", "429", "500", "502", "503",
                    "504"}
# Errors while a response body streams in: botocore does not retry these.
_BODY_ERRORS = (botocore.exceptions.ReadTimeoutError, botocore.exceptions.IncompleteReadError,
                botocore.exceptions.ResponseStreamingError, urllib3.exceptions.HTTPError,
                ConnectionError, TimeoutError)


# Keys the start-up check asks for (see Remote.probe).
PROBE_KEYS = 100


def addressing(flag: AddressingStyle | None, profile_s3: Any, endpoint_url: str | None) -> AddressingStyle:
    """The bucket addressing both clients use: --addressing-style; else the
    profile's own (`s3 = addressing_style = ...`); else path-style for an
    endpoint of the user's, from whatever source (MinIO, Ceph and most
    S3-compatible stores need it, and a host name such as localhost has no
    bucket subdomains), else "auto" (AWS itself: virtual-hosted)."""
    profile = profile_s3.get("addressing_style") if isinstance(profile_s3, dict) else None
    if profile in ("auto", "path", "virtual"):
        return flag or cast(AddressingStyle, profile)
    return flag or ("path" if endpoint_url else "auto")


def configured_endpoint(core: botocore.session.Session, flag_or_env: str | None) -> str | None:
    """The endpoint botocore would use, from every source it reads (the flag,
    AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's endpoint_url or its
    `services` section), checked as the flag's is: one a profile gives
    without a scheme is a configuration error, not botocore's ValueError."""
    if flag_or_env or core.get_config_variable("ignore_configured_endpoint_urls"):
        return flag_or_env
    found = botocore.configprovider.ConfiguredEndpointProvider(
        full_config=core.full_config, scoped_config=core.get_scoped_config(), client_name="s3").provide()
    return endpoint(str(found), {}) if found else None


class Remote:
    def __init__(self, cfg: RemoteConfig, late_credentials: bool = False) -> None:
        """`late_credentials` (a mount's): credentials that cannot be had now for a reason that may
        pass are had at a later request (awssession.LateCredentials); `start_failure` says why."""
        self.cfg = cfg
        core = awssession.session(cfg, late_credentials)
        endpoint_url = configured_endpoint(core, cfg.endpoint_url)
        # What both clients address buckets by (crt.py's Endpoint too).
        self.addressing_style = addressing(cfg.addressing_style, core.get_config_variable("s3"), endpoint_url)
        config = botocore.config.Config(
            # Attempts in all: a client's "max_attempts" counts retries (one more).
            retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            max_pool_connections=cfg.max_pool_connections,
            s3={"addressing_style": self.addressing_style},
            # We send no request bodies, and verify whole files ourselves
            # (fetch.py); ranged responses carry no checksum to validate.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # botocore's session and client are boto3's, without the import of
        # boto3 and s3transfer (start-up time).
        self._client = botoretries.client(core, endpoint_url=endpoint_url, region_name=cfg.region, config=config)
        listxml.register(self._client.meta.events, botocore.handlers._handle_200_error)  # type: ignore[attr-defined]
        self._client.meta.events.register_first("before-parse.s3.*", objectheaders.keep_sent_length)
        # Every attempt counted, every retry logged (botocore's retries are its own).
        ClientAttempts(cfg.max_attempts).register(self._client.meta.events)
        self.endpoint_url: str = self._client.meta.endpoint_url  # where requests go (the CRT's too)
        self.endpoint = redact.url(self.endpoint_url)  # how every line shows it: its password masked
        self.region: str = self._client.meta.region_name or "us-east-1"
        self.verify: bool | str = core.get_config_variable("ca_bundle") or True  # its TLS trust (and the CRT's)
        self._core = core
        # Credentials due for a refresh are had through this bounded wait before a request (and the
        # CRT's signing): botocore's signing would refresh them in the request's thread, for as long
        # as a hung credential helper hangs, and the read would fail as a stalled network.
        # The client's own credentials object (the session resolved them once, at start): only
        # refreshable (temporary) ones are ever due.  None: static keys, or none at all.
        creds = core.get_credentials()
        self._refresh_due = getattr(creds, "refresh_needed", None)
        # Why the credentials could not be had at start (a mount starts offline for it: startup.py), or None.
        self.start_failure = creds.failure if isinstance(creds, awssession.LateCredentials) else None
        self.bounded_credentials = BotocoreCredentials(
            self.frozen_credentials, wait_for_credentials(cfg.read_timeout), self._refresh_due or (lambda: False),
            awssession.may_pass, lambda: awssession.source_of(creds), str(self.start_failure or ""))

    def frozen_credentials(self) -> tuple[str, str, str | None]:
        """The credentials botocore's chain resolved, refreshed when they are
        about to expire (for the CRT's ranged GETs: one chain, not two)."""
        try:
            creds = self._core.get_credentials()
            if creds is None:
                raise AccessDenied("no usable AWS credentials (environment, profiles, container or IRSA roles)")
            frozen = creds.get_frozen_credentials()
        except (*awssession.NO_CREDENTIALS, OSError) as e:  # (said masked: botocore's text is not chained)
            raise awssession.unavailable(e) from None
        return frozen.access_key or "", frozen.secret_key or "", frozen.token

    def credential_source(self) -> tuple[str, str] | None:
        """Where boto3's chain found credentials ("env", "shared-credentials-file",
        "iam-role", "assume-role-with-web-identity", ...) and the access key id
        with all but its ends masked; None when there are none.  Never the secret."""
        try:
            creds = self._core.get_credentials()
        except (*awssession.NO_CREDENTIALS, OSError) as e:  # a role's first STS call, say
            raise awssession.unavailable(e) from None
        if creds is None:
            return None
        key = creds.access_key or ""
        masked = f"{key[:4]}...{key[-4:]}" if len(key) > 8 else "***"
        return getattr(creds, "method", "unknown"), masked

    # -- listing -----------------------------------------------------------

    def list_page(self, bucket: str, prefix: str, *, delimiter: bool = False, start_after: str = "",
                  token: str | None = None, max_keys: int = 1000) -> ListPage:
        """One ListObjectsV2 request: up to `max_keys` entries under `prefix`
        in key order, after `start_after` or from the page `token` names (S3
        ignores StartAfter once there is a token, so only one is sent); with
        `delimiter`, the common prefixes ("folders") instead of deeper keys."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            kwargs["Delimiter"] = "/"
        if token:
            kwargs["ContinuationToken"] = token
        elif start_after:
            kwargs["StartAfter"] = start_after
        resp = self._call(self._client.list_objects_v2, bucket, prefix, **kwargs)
        objects, folders, truncated, next_token = listxml.listing(bucket, prefix, resp)
        # A store that says "truncated" without a token cannot be paged on: a failed listing.
        return ListPage(objects, folders, listanswers.next_token(bucket, prefix, truncated, next_token))

    def list_some(self, bucket: str, prefix: str, max_keys: int = 1000) -> tuple[list[RemoteObject], bool]:
        """The first `max_keys` objects under `prefix`, and whether there are more."""
        resp = self._call(self._client.list_objects_v2, bucket, prefix, Bucket=bucket, Prefix=prefix,
                          MaxKeys=max_keys)
        objects, _, truncated, _ = listxml.listing(bucket, prefix, resp)
        return objects, truncated

    def probe(self, source: Source) -> ListPage:
        """One request proving the bucket exists and the folder can be listed:
        its first PROBE_KEYS keys, which for a model's folder is the whole
        listing (small enough a page not to hold up the start of a huge one)."""
        return self.list_page(source.bucket, source.prefix, max_keys=PROBE_KEYS)

    # -- objects -------------------------------------------------------------

    def head(self, bucket: str, key: str, etag: str | None = None, version_id: str = "") -> HeadInfo:
        """Current metadata of one object (`version_id`: of that version, "null" too), with its additional
        checksum if any; with `etag`, only if that version is still current (ObjectChanged if not: a 412, or
        an answer for another ETag from a store that ignores If-Match)."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'
        if version_id:
            kwargs["VersionId"] = version_id
        resp = self._call(self._client.head_object, bucket, key, **kwargs)
        answers.check_etag(bucket, key, etag or "", resp.get("ETag"), "HEAD")  # a store that ignores If-Match
        obj = objectheaders.head_object(bucket, key, resp)  # a proxy's page is no object's HEAD: RemoteError
        sse = resp.get("ServerSideEncryption") or ""
        etag_is_md5 = self.cfg.etag_is_md5 and sse in ("", "AES256") and not resp.get("SSECustomerAlgorithm")
        return HeadInfo(obj, objectheaders.checksum_of(resp), etag_is_md5, objectheaders.version_id(resp))

    def part(self, obj: RemoteObject, number: int) -> Part | None:
        """What the store says of part `number` of a multipart object: its size,
        and how many parts it reports (0: it did not say, as Ceph RGW and s3rver,
        which ignore partNumber).  No If-Match: some stores compare it with the
        part's own ETag; the caller checks the object's version separately.
        An unreachable store raises (RemoteUnavailable): it is not one that cannot say; an
        answer of no part of it, WrongRange (objectheaders.part_of)."""
        kwargs: dict[str, Any] = {"Bucket": obj.bucket, "Key": obj.key, "PartNumber": number}
        if obj.version_id:
            kwargs["VersionId"] = obj.version_id
        try:
            resp = self._call(self._client.head_object, obj.bucket, obj.key, **kwargs)
        except RemoteError as e:
            if isinstance(e, RemoteUnavailable):
                raise
            log.debug("%s: part %d unknown: %s", quoted(obj.uri), number, e)
            return None
        return objectheaders.part_of(obj, number, resp)

    def versioning(self, bucket: str) -> str | None:
        """GetBucketVersioning: "" when versioning was never turned on (S3
        then names no status); None when the answer is refused or fails (a
        lock's credentials need not be allowed it: only its wording uses it)."""
        try:
            resp = self._call(self._client.get_bucket_versioning, bucket, "", Bucket=bucket)
        except RemoteError as e:
            log.debug("bucket %s: versioning unknown: %s", bucket, e)
            return None
        return str(resp.get("Status") or "")

    def get_range(self, obj: RemoteObject, start: int, end: int) -> RangeStream:
        """Stream bytes [start, end) of exactly the version `obj` names: the GET
        carries If-Match on its ETag, so a replaced object fails with
        ObjectChanged instead of mixing two versions, and its answer is
        checked before a byte is read (answers.py: a store that ignores Range
        or If-Match is WrongRange or ObjectChanged).  A request for the whole
        object asks for its checksum too (S3 returns none for a range), which
        spares the HEAD verification would otherwise need.  A version a lock
        pins by its id is asked for by that id (?versionId=)."""
        whole = start == 0 and end == obj.size
        kwargs: dict[str, Any] = {"Bucket": obj.bucket, "Key": obj.key}
        if obj.version_id:
            kwargs["VersionId"] = obj.version_id
        if whole:
            kwargs["ChecksumMode"] = "ENABLED"
        else:
            kwargs["Range"] = f"bytes={start}-{end - 1}"
        if obj.etag:
            kwargs["IfMatch"] = f'"{obj.etag}"'
        try:
            resp = self._call(self._client.get_object, obj.bucket, obj.key, **kwargs)
        except RemoteError as e:  # a 416 for bytes inside its size: it is shorter now, another version
            cause = e.__cause__
            err = cause.response if isinstance(cause, botocore.exceptions.ClientError) else {}
            raise answers.unsatisfiable(obj, start, end, err.get("ResponseMetadata", {}).get("HTTPStatusCode", 0),
                                        str(err.get("Error", {}).get("Code", ""))) or e from cause
        sse_ok = (resp.get("ServerSideEncryption") or "") in ("", "AES256") and not resp.get("SSECustomerAlgorithm")
        meta = ResponseMeta(etag_is_md5=self.cfg.etag_is_md5 and sse_ok,
                            checksum=objectheaders.checksum_of(resp) if whole else None)
        stream = RangeStream(resp["Body"], obj, start, end, meta)
        try:  # the bytes asked for, of this version, or none of them is read
            answers.check(obj, start, end, resp["ResponseMetadata"]["HTTPStatusCode"], resp.get("ContentRange"),
                          resp.get("ETag"), resp.get(objectheaders.SENT_LENGTH, resp.get("ContentLength")),
                          resp.get("ContentType"), resp.get("ContentEncoding"))
        except RemoteError:
            stream.close()
            raise
        return stream

    # -- errors --------------------------------------------------------------

    def _call(self, fn: Any, bucket: str, key: str, **kwargs: Any) -> Any:
        op = _OPS.get(fn.__name__, fn.__name__)
        started = time.monotonic()
        calling(op, bucket, key)  # its attempts and their failures are counted as they happen (clientretries.py)
        try:
            self._refreshed_in_time(bucket, key)
            return fn(**kwargs)
        except Exception as e:  # translated exhaustively below; a credential error's text, masked, not chained
            raise self.translate(e, bucket, key) from (None if isinstance(e, awssession.NO_CREDENTIALS) else e)
        finally:
            TIMINGS.request(op, time.monotonic() - started)

    def _refreshed_in_time(self, bucket: str, key: str) -> None:
        """Credentials botocore would refresh at this request's signing are
        refreshed first, waited for at most half of --read-timeout: a helper
        that hangs is then EACCES with a line naming credentials, not a read
        that waits out --read-deadline for a request stuck in its signing."""
        if self._refresh_due is None or not self._refresh_due():
            return
        try:
            self.bounded_credentials.get()
        except CredentialsUnavailable as e:
            kind = errors.CredentialsUnreachable if e.may_pass else AccessDenied
            raise kind(f"{quoted(f's3://{bucket}/{key}')}: {e}", bucket=bucket, key=key) from None

    def translate(self, e: BaseException, bucket: str, key: str) -> RemoteError:
        where = quoted(f"s3://{bucket}/{key}")
        if isinstance(e, RemoteError):
            return e
        if isinstance(e, botocore.exceptions.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = err.get("Message") or code
            if status in answers.REDIRECTS:  # never followed (answers.py); botocore's region retry, if any, done
                headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                to, region = headers.get("location") or err.get("Endpoint"), headers.get("x-amz-bucket-region")
                return answers.redirected(bucket, key, _OPS.get(e.operation_name, e.operation_name), status, code,
                                          str(to) if to else None, str(region) if region else None)
            if code == "NoSuchBucket":
                return BucketNotFound(f"bucket {bucket} does not exist at {self.endpoint}",
                                      bucket=bucket, key=key)
            if code in _DENIED or status == 403:
                return AccessDenied(f"access denied to {where} ({code}: {message})", bucket=bucket, key=key)
            if code in _CHANGED or status == 412:
                return ObjectChanged(f"{where} changed in the object store", bucket=bucket, key=key)
            if code in _NOT_FOUND or status == 404:
                return ObjectNotFound(f"{where} no longer exists", bucket=bucket, key=key)
            if code in _TRANSIENT_CODES or status >= 500:
                return errors.RemoteFailing(f"{where}: object store kept failing ({code}: {message})",
                                            bucket=bucket, key=key)  # answered: reachable, failing
            return RemoteError(f"{where}: {code}: {message}", bucket=bucket, key=key)
        if isinstance(e, botocore.exceptions.NoCredentialsError):
            return AccessDenied(f"no usable AWS credentials for {where} ({redact.said(e)})", bucket=bucket, key=key)
        if isinstance(e, awssession.NO_CREDENTIALS):  # a refresh failed mid-run (a token revoked, an endpoint gone)
            kind = errors.CredentialsUnreachable if awssession.may_pass(e) else AccessDenied
            return kind(f"no usable AWS credentials for {where} ({redact.said(e)})", bucket=bucket, key=key)
        if lack := exhausted.descriptor_errno(e):  # no socket to try with: not the network (exhausted.py)
            return errors.OutOfDescriptors(f"{where}: cannot open a connection to the object store: "
                                           f"{exhausted.descriptors(lack)}", lack, bucket=bucket, key=key)
        if isinstance(e, (botocore.exceptions.EndpointConnectionError,
                          botocore.exceptions.ConnectTimeoutError)):
            return RemoteUnavailable(f"cannot reach the object store at {self.endpoint}", bucket=bucket, key=key)
        if isinstance(e, (_BODY_ERRORS, botocore.exceptions.BotoCoreError)):
            return RemoteUnavailable(f"{where}: {type(e).__name__}: {e}", bucket=bucket, key=key)
        return RemoteError(f"{where}: unexpected {type(e).__name__}: {e}", bucket=bucket, key=key)


class RangeStream:
    """The body of one ranged GET.  Read errors (a reset, a stalled connection
    hitting the read timeout, a short body) surface as RemoteUnavailable."""

    def __init__(self, body: Any, obj: RemoteObject, start: int, end: int, meta: ResponseMeta) -> None:
        self._body = body
        self._obj = obj
        self.start = start
        self.end = end
        self.meta = meta
        self.received = 0

    def read(self, n: int) -> bytes:
        try:
            data: bytes = self._body.read(n)
        except _BODY_ERRORS as e:
            raise RemoteUnavailable(broke_off(self._obj, self.start, self.end, self.received, type(e).__name__),
                                    bucket=self._obj.bucket, key=self._obj.key) from e
        self.received += len(data)
        if not data and self.received < self.end - self.start:
            raise RemoteUnavailable(f"{quoted(self._obj.uri)}: response ended {self.end - self.start - self.received}"
                                    " bytes early", bucket=self._obj.bucket, key=self._obj.key)
        return data

    def close(self) -> None:
        try:
            self._body.close()
        except Exception:  # closing a broken stream must not mask the real error
            pass
