"""Ranged GETs through awscrt's S3 client (`--transfer-client crt`).

The C client (what Mountpoint and s3torchconnector build on) runs HTTP, TLS
and its connections on its own event-loop threads; Python sees one callback
per part received, which it writes into the sparse file.  boto3 keeps
everything else (listings, HEADs, the configuration), and lends this client
what botocore resolved: where to send a GET (the endpoint from a flag, the
environment or the profile, with any path; the region; the CA bundle it
trusts) and its credentials: one chain (profiles, SSO, IRSA, container
roles, environment), refreshed by botocore (crtcreds.py), signed by the CRT.

`fetch_range_crt` has the contract of ranged_get.fetch_range_blocking: it
runs in a worker thread, writes only its own byte range, and tells the trio
thread about progress through the job's callbacks.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

from lazyfs import crtanswer
from lazyfs.backoff import retry_delay
from lazyfs.config import FetchConfig, RemoteConfig
from lazyfs.crtanswer import Answered
from lazyfs.crtanswer import Received as _Received
from lazyfs.crtcreds import BotocoreCredentials
from lazyfs.crtlimits import MIN_MEMORY, buffer_memory
from lazyfs.errors import OutOfDescriptors, RemoteError, RemoteUnavailable
from lazyfs.exhausted import descriptors, short_of_descriptors
from lazyfs.namespace import RemoteObject
from lazyfs.ranged_get import RangeJob, Stopped, naming
from lazyfs.repeats import retry_line, shape
from lazyfs.stats import STATS
from lazyfs.storewrite import PieceWriter
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

# How often a waiting worker looks at its request (cancel, stall).
_POLL_S = 0.2
# Descriptors the client takes as it is made (19 with awscrt 0.38: its event loops' and the S3 client's own), with room.
CRT_DESCRIPTORS = 24
# A bucket name that can be a DNS label (botocore's isVirtualHostableS3Bucket).
_HOST_LABELS = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where boto3's client sends its requests, as botocore resolved it (flags,
    environment, the profile's endpoint_url and ca_bundle): the CRT's GETs go
    to the same place, the same way (remote.Remote has these, and the
    addressing both clients use: remote.addressing)."""

    url: str  # with any path a gateway puts before the bucket
    region: str
    addressing_style: str  # "auto", "path" or "virtual": remote.addressing's
    verify: bool | str = True  # False: no certificate check; a path: the CA bundle to trust


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _tls_options(verify: bool | str) -> Any:
    """The CRT's TLS, trusting what botocore trusts: the system's store, a CA
    bundle (AWS_CA_BUNDLE, the profile's ca_bundle), or no check at all."""
    from awscrt import io

    options = io.TlsContextOptions()
    if isinstance(verify, str):
        options.override_default_trust_store_from_path(ca_filepath=verify)
    elif not verify:
        options.verify_peer = False
    return io.ClientTlsContext(options).new_connection_options()


class CrtTransfer:
    """One awscrt S3 client for the process's ranged GETs."""

    def __init__(self, cfg: RemoteConfig, endpoint: Endpoint, credentials: BotocoreCredentials,
                 part_size: int, max_connections: int, buffers: int = MIN_MEMORY) -> None:
        from awscrt import auth, io, s3  # imported when chosen: start-up does not pay for it

        self.cfg = cfg
        self._endpoint = endpoint
        url = urllib.parse.urlsplit(endpoint.url)
        self._https = url.scheme == "https"
        self._host = url.hostname or ""
        self._port = url.port
        # A gateway's path (http://host/gw): botocore puts it before the bucket or key, so do we.
        self._prefix = url.path.rstrip("/")
        self._ip_host = _is_ip(self._host)
        self._creds = credentials  # the same bounded refresh as boto3's requests (remote.Remote)
        loops = io.EventLoopGroup(num_threads=2)
        bootstrap = io.ClientBootstrap(loops, io.DefaultHostResolver(loops))
        provider = auth.AwsCredentialsProvider.new_delegate(self._creds)
        signing = s3.create_default_s3_signing_config(region=endpoint.region, credential_provider=provider)
        self._client = s3.S3Client(
            bootstrap=bootstrap, region=endpoint.region, signing_config=signing,
            tls_mode=s3.S3RequestTlsMode.ENABLED if self._https else s3.S3RequestTlsMode.DISABLED,
            tls_connection_options=_tls_options(endpoint.verify) if self._https else None,
            # One part per request: bytes arrive in order and a request is one GET.
            part_size=(part_size := max(part_size, 5 * 1024 * 1024)),
            max_active_connections_override=max_connections,
            # No retries of its own: it reports none of them (no line, no
            # count), and its max_retries=0 means its default of 5.  _fetch
            # retries, --retries times, with backoff and one line each.
            retry_config=s3.S3RetryConfig(retry_mode=s3.S3RetryMode.NONE),
            connect_timeout_ms=int(cfg.connect_timeout * 1000),
            # The client's own part buffers (crtlimits: at least 256 MiB, and twice
            # the part size, which config.py checked against them).
            memory_limit=buffers)
        self._s3 = s3
        self._part_size = part_size

    def _target(self, obj: RemoteObject) -> tuple[str, str]:
        """(Host header, path) for `obj`, path-style or virtual-hosted; the
        path asks for the version a lock pins by its id (?versionId=)."""
        port = f":{self._port}" if self._port else ""
        key = urllib.parse.quote(obj.key, safe="/~")
        query = f"?versionId={urllib.parse.quote(obj.version_id, safe='')}" if obj.version_id else ""
        if not self._virtual_hosted(obj.bucket):
            return f"{self._host}{port}", f"{self._prefix}/{obj.bucket}/{key}{query}"
        return f"{obj.bucket}.{self._host}{port}", f"{self._prefix}/{key}{query}"

    def _virtual_hosted(self, bucket: str) -> bool:
        """As botocore's endpoint rules: path-style when asked for, for an
        endpoint given as an IP address, and for a bucket that cannot be a host
        name (a dot, under TLS, would not match the certificate)."""
        style = self._endpoint.addressing_style
        if style == "path" or ("." in bucket and self._https):
            return False
        return style == "virtual" or (not self._ip_host and _HOST_LABELS.fullmatch(bucket) is not None)

    def fetch(self, job: RangeJob) -> None:
        """GET the job's bytes into the file; after a failure that may pass (a
        5xx, a refused connection, a stall, a body cut), try again, resuming
        where the bytes stopped, --retries times (the client retries nothing)."""
        with job.writer() as writer:
            self._fetch(job, writer)

    def _fetch(self, job: RangeJob, writer: PieceWriter) -> None:
        pos, attempt, split = job.start, 0, False
        while pos < job.end:
            if job.cancelled():
                raise Stopped()
            # After a stall, the rest is asked for a block per request: each seen as it lands, and each
            # answer checked (the client shows the headers of a request's first part only: crtanswer.py).
            end = min(job.end, (pos // job.block_size + 1) * job.block_size) if split else job.end
            state = _Received(job, writer, pos, pos == 0 and end == job.obj.size, self.cfg.etag_is_md5, end)
            job.attempting(pos)  # the part pace times the attempt that delivers, not the failures and waits before
            try:
                self._one_request(state)
                pos = end
                continue
            except RemoteUnavailable as e:
                attempt += 1
                if not state.transient():
                    raise
                if attempt >= self.cfg.max_attempts:
                    if isinstance(e, Answered):
                        raise e.kept_failing() from None
                    raise
                delay = retry_delay(attempt)
                retry_line(log, logging.INFO, (job.obj.uri, shape(str(e)), attempt), "%s; retrying bytes %d-%d "
                           "in %.1f s (attempt %d of %d)", naming(job.obj, e), state.reached, job.end - 1, delay,
                           attempt + 1, self.cfg.max_attempts)
                STATS.bump("retries")
                time.sleep(delay)
                pos = state.reached
                # The client shows no byte of a part until all of it is in (partpace.py): after a
                # stall, the rest comes block by block, each seen as it lands, on the link grown slow,
                # and the sweep's next requests are sized for it.
                if state.stalled:
                    job.stalled(job.block_size if split else job.end - state.start, self.cfg.read_timeout)
                split = split or state.stalled

    def _get(self, state: _Received) -> Any:
        """The GET of [state.reached, state.end), pinned to the listed version."""
        from awscrt import http

        job = state.job
        host, path = self._target(job.obj)
        headers = [("Host", host), ("Range", f"bytes={state.reached}-{state.end - 1}")]
        if job.obj.etag:
            headers.append(("If-Match", f'"{job.obj.etag}"'))
        if state.whole:
            headers.append(("x-amz-checksum-mode", "ENABLED"))
        return http.HttpRequest("GET", path, http.HttpHeaders(headers))

    def _one_request(self, state: _Received) -> None:
        """One GET of [state.reached, state.end), one part: its answer is checked (crtanswer.py)."""
        state.part_size = self._part_size
        STATS.bump("s3_requests", "GET")  # its first part; the client sends a GET per part (below)
        request = self._client.make_request(
            type=self._s3.S3RequestType.GET_OBJECT, request=self._get(state),
            on_headers=state.on_headers, on_body=state.on_body, on_progress=state.on_progress)
        ended = False
        try:
            self._wait(request, state)
            ended = True
        except BaseException as e:
            request.cancel()
            if isinstance(e, RemoteError):
                STATS.bump("s3_errors", "GET")  # retried by _fetch, if at all: each failure is one attempt's
            raise
        finally:
            # The parts that arrived, and the one that failed: what the metrics can see of a
            # request of several parts (parts in flight beside a failed one are not).
            STATS.bump("s3_requests", "GET", max(0, state.parts + (0 if ended else 1) - 1))

    def _wait(self, request: Any, state: _Received) -> None:
        job = state.job
        while True:
            try:
                request.finished_future.result(timeout=_POLL_S)
                break
            except concurrent.futures.TimeoutError:
                if state.error is not None:  # an answer refused (answers.py), a write failed: end the request
                    raise state.error from None
            except Exception as e:
                if state.error is not None:
                    raise state.error from None
                name = str(getattr(e, "name", ""))
                if name.startswith("AWS_AUTH_"):  # signing failed for want of credentials (crtcreds.py)
                    raise self._creds.refused(job.obj, name) from None
                raise self._translate(e, job.obj, state) from None
            if job.cancelled():
                raise Stopped()
            if time.monotonic() - state.active > self.cfg.read_timeout:
                if self._creds.waiting():  # not the network: botocore has not answered
                    raise self._creds.refused(job.obj, "waiting for credentials")
                state.stalled = True
                raise RemoteUnavailable(state.broke_off(f"stalled: no byte for {self.cfg.read_timeout:g} s"),
                                        bucket=job.obj.bucket, key=job.obj.key)
        if state.error is not None:
            raise state.error
        if state.reached < state.end:
            raise RemoteUnavailable(f"{quoted(job.obj.uri)}: response ended {state.end - state.reached} bytes early",
                                    bucket=job.obj.bucket, key=job.obj.key)

    def _translate(self, e: Exception, obj: RemoteObject, state: _Received) -> RemoteError:
        if getattr(e, "name", "") in crtanswer.UNSHOWN and (seen := self._look_again(state)) is not None:
            return seen
        return crtanswer.translate(e, obj, state, lambda: f"{'https' if self._https else 'http'}://{self._target(obj)[0]}")

    def _look_again(self, state: _Received) -> RemoteError | None:
        """The client refused an answer without showing it (no headers: crtanswer.UNSHOWN).  The same GET
        once more as a request it passes through as it comes (DEFAULT), cancelled at its headers (no byte
        of it taken), which are checked as any answer's: the line says what came, as boto3's does.  None
        if it shows nothing wrong (or nothing within --read-timeout): the client's own words then."""
        seen: list[tuple[int, list[tuple[str, str]]]] = []
        arrived = threading.Event()

        def on_headers(status_code: int, headers: list[tuple[str, str]], **kwargs: Any) -> None:
            seen.append((status_code, headers))
            arrived.set()

        STATS.bump("s3_requests", "GET")
        request = self._client.make_request(type=self._s3.S3RequestType.DEFAULT, operation_name="GetObject",
                                            request=self._get(state), on_headers=on_headers,
                                            on_body=lambda **kwargs: None, on_done=lambda **kwargs: arrived.set())
        try:
            arrived.wait(self.cfg.read_timeout)
        finally:
            request.cancel()
        return crtanswer.refusal(state, *seen[0]) if seen else None


def transfer_for(remote: Any, cfg: FetchConfig, memory_limit: int = MIN_MEMORY) -> Callable[[RangeJob], None] | None:
    """The CRT's fetch for `remote` (a remote.Remote) when --transfer-client crt; None for boto3.
    Half of --memory-limit (at least 256 MiB) for its buffers."""
    if cfg.transfer_client != "crt":
        return None
    endpoint = Endpoint(remote.endpoint_url, remote.region, remote.addressing_style, remote.verify)
    # Its event loops and the S3 client's own take ~20 descriptors; short of them awscrt fails with "46
    # (AWS_ERROR_SYS_CALL_FAILURE)", which says neither which call nor why, or aborts the process (SIGABRT).
    if lack := short_of_descriptors(CRT_DESCRIPTORS):
        raise OutOfDescriptors(f"cannot start the CRT transfer client: {descriptors(lack)}", lack)
    client = CrtTransfer(remote.cfg, endpoint, remote.bounded_credentials, cfg.part_size, cfg.max_connections,
                         buffer_memory(memory_limit))
    return client.fetch
