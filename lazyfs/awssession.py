"""The botocore session a process's client is built on: a data loader that
skips botocore's start-up scan of its 400+ service folders, and the
credentials resolved once, at start, within a bounded wait, with each way
they can be missing turned into a lazyfs error a user can act on.  A mount
whose credentials cannot be had at start for a reason that may pass (their
source unreachable, failing or hanging: may_pass) gets a stand-in that has
them at a later use (LateCredentials), and starts offline.  The only other
module (with remote.py) that imports botocore."""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import signal
import subprocess
import threading
from typing import Any, Callable, ClassVar

import botocore.credentials
import botocore.exceptions
import botocore.loaders
import botocore.session
import botocore.utils

from lazyfs.config import RemoteConfig
from lazyfs.errors import AccessDenied, ConfigError, CredentialsUnreachable
from lazyfs.redact import said

log = logging.getLogger(__name__)

# botocore's errors for credentials it could not get (a source misconfigured,
# failing or refusing): the credentials' fault, as a refusal is.
NO_CREDENTIALS = (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError,
                  botocore.exceptions.CredentialRetrievalError, botocore.exceptions.MetadataRetrievalError,
                  botocore.exceptions.InvalidConfigError, botocore.exceptions.RefreshWithMFAUnsupportedError,
                  botocore.exceptions.TokenRetrievalError, botocore.exceptions.SSOError,
                  botocore.exceptions.UnknownCredentialError, botocore.exceptions.ConfigParseError,
                  UnicodeDecodeError, json.JSONDecodeError)  # (GARBLED, below)
# What botocore's chain raises when it runs: its own errors, those of a client it
# asks (STS for a role: a ClientError), a file it reads (a token file).
# A credential_process whose words botocore cannot read: stderr not UTF-8 (botocore decodes it for
# its error, and raises this instead), stdout not JSON.  A helper failing, as one exiting non-zero.
GARBLED = (UnicodeDecodeError, json.JSONDecodeError)
CHAIN_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError, *GARBLED)
# Credentials that could not be had for these may be had later with nothing
# changed: a source that did not answer, or answered with an error (a container
# or instance endpoint; a credential_process exiting non-zero, which botocore
# cannot tell from a broken one), STS for a role unreachable.  Anything else (a
# key id without its secret, a malformed config, a token file missing, STS's
# refusal, an SSO session expired, a TLS certificate refused) stays what it is
# until someone changes the configuration.
_PASSING = (botocore.exceptions.CredentialRetrievalError, botocore.exceptions.MetadataRetrievalError,
            botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError, CredentialsUnreachable, *GARBLED)
# STS's answers that say "later" with a 4xx (the web identity's IdP unreachable from STS, throttling).
_PASSING_CODES = {"IDPCommunicationError", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
# A start-up wait for credentials still unanswered after this long is said so in one line.
SAY_WAITING_AFTER_S = 1.0
# What a mount's start found when the chain gave no credentials at all, the instance metadata service asked.
NONE_FOUND = ("no AWS credentials: none in the environment, the profiles or a container endpoint, and the instance "
              "metadata service (IMDS) gave none (it did not answer, answered with an error, or the instance has "
              "no role)")

# botocore's credential sources (its providers' METHOD), in words: what a wait for credentials waits for.
SOURCES = {"custom-process": "the profile's credential_process", "container-role": "the container credentials "
           "endpoint", "iam-role": "the instance metadata service (IMDS)", "assume-role": "STS, for the profile's "
           "role", "assume-role-with-web-identity": "STS, for the web identity's role", "sso": "AWS SSO",
           "login": "the profile's console login"}
ANY_SOURCE = "the credential source (a credential_process, a container or instance endpoint)"

# The services a session of ours loads models of: s3, and those botocore's
# credential providers build clients for (AssumeRole and web identity: sts;
# SSO profiles: sso and sso-oidc).
QUICK_SERVICES = ("s3", "sts", "sso", "sso-oidc")


class _QuickLoader(botocore.loaders.Loader):
    """botocore's data loader, less a start-up cost: before it loads a
    model, botocore lists every service folder it ships (400+ folders,
    ~1,800 stat calls: 20 ms of the ready line) to check that the name is
    one of them.  For the services of QUICK_SERVICES it looks for that one
    folder only; a model of any other service (a credential provider
    botocore adds later) turns botocore's full check back on, for good, so
    no service it ships is ever refused."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._full = False  # only ever set: a race shows a thread the full list, which is never wrong
        self._shipped: dict[str, list[str]] = {}  # by type name (a race computes one twice, the same)

    @classmethod
    def for_session(cls, core: botocore.session.Session) -> _QuickLoader:
        # As botocore.loaders.create_loader: the session's data_path
        # (AWS_DATA_PATH) is searched before botocore's own data.
        data_path = core.get_config_variable("data_path")
        return cls(extra_search_paths=[os.path.expanduser(os.path.expandvars(p))
                                       for p in data_path.split(os.pathsep)] if data_path else None)

    def load_service_model(self, service_name: str, type_name: str, api_version: str | None = None) -> Any:
        if service_name not in QUICK_SERVICES:
            self._full = True
        return super().load_service_model(service_name, type_name, api_version)

    def list_available_services(self, type_name: str) -> list[str]:
        if not self._full:
            shipped = self._shipped.get(type_name)
            if shipped is None:
                shipped = self._shipped[type_name] = [n for n in QUICK_SERVICES if self._ships(n, type_name)]
            if shipped:
                return list(shipped)
        return list(super().list_available_services(type_name))

    def _ships(self, service_name: str, type_name: str) -> bool:
        try:
            return bool(self.list_api_versions(service_name, type_name))
        except botocore.exceptions.DataNotFoundError:
            return False


def session(cfg: RemoteConfig, late_ok: bool = False) -> botocore.session.Session:
    """A botocore session with our loader and its credentials resolved, or
    the reason there are none as a lazyfs error: a profile that does not
    exist is a configuration error (exit 2); a source that fails, is
    misconfigured or does not answer within `connect_timeout +
    read_timeout` (a hung credential_process), AccessDenied (exit 1).  No
    credentials at all is not an error here: the first request says so.
    `late_ok` (a mount's start): credentials that cannot be had for a reason
    that may pass, or none at all with the instance metadata service asked,
    are no error either: the session holds a LateCredentials saying why."""
    patience = cfg.connect_timeout + cfg.read_timeout
    found: Any = None
    try:
        core = botocore.session.get_session()
        core.register_component("data_loader", _QuickLoader.for_session(core))
        # botocore parses every timestamp with dateutil: three quarters of the
        # CPU a 1000-key listing costs.  We read one field and parse it ourselves.
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
        _Helpers.watch(core)
        asking = _Asking(core)
        try:
            found = _resolve_credentials(core, patience, asking)
        except (*CHAIN_ERRORS, CredentialsUnreachable) as e:
            if not late_ok or not may_pass(e):
                raise
            LateCredentials.stand_in(core, patience, unreachable(e), asking)
            return core
    except botocore.exceptions.ProfileNotFound as e:
        raise ConfigError(f"AWS profile {e.kwargs.get('profile', '')!r} is not defined in ~/.aws/config or "
                          "~/.aws/credentials (AWS_PROFILE, AWS_CONFIG_FILE)") from None
    except (*NO_CREDENTIALS, OSError) as e:
        raise unavailable(e) from None
    if late_ok and cfg.instance_metadata and found is None:  # (asking the session again would run the chain again)
        LateCredentials.stand_in(core, patience, CredentialsUnreachable(NONE_FOUND), asking)
    return core


def source_of(creds: Any) -> str:
    """The source `creds` come from, or are being asked of, in words ("": unknown)."""
    if isinstance(creds, LateCredentials):
        return creds.source()
    return SOURCES.get(str(getattr(creds, "method", "")), "")


class _Asking:
    """Which source of botocore's chain is asked now (its provider's METHOD):
    each provider's load() is wrapped to say so, so that a wait that gives up
    names what it waited for."""

    def __init__(self, core: botocore.session.Session | None) -> None:
        self.method = ""  # the last provider asked (one assignment: read from the waiting thread)
        for provider in getattr(core.get_component("credential_provider"), "providers", ()) if core else ():
            provider.load = self._saying(provider)

    @classmethod
    def none(cls) -> _Asking:
        """One that knows nothing of what is asked."""
        return cls(None)

    def _saying(self, provider: Any) -> Callable[..., Any]:
        load = provider.load

        def asked(*args: Any, **kwargs: Any) -> Any:
            self.method = str(getattr(provider, "METHOD", "") or "")
            return load(*args, **kwargs)
        return asked

    def source(self) -> str:
        return SOURCES.get(self.method, ANY_SOURCE)


def _resolve_credentials(core: botocore.session.Session, patience: float, asking: _Asking) -> Any:
    """botocore's chain, run on a thread (a credential_process or an
    endpoint may never answer): the session keeps what it finds (None: no
    credentials at all).  A line after SAY_WAITING_AFTER_S says what the
    start waits for."""
    def say_waiting() -> None:
        profile = core.get_config_variable("profile")
        log.info("waiting for AWS credentials%s (at most %g s)", f" of profile {profile!r}" if profile else "",
                 patience)

    return _within(lambda: _unexpired(core.get_credentials()), patience, asking, say_waiting)


def _unexpired(found: Any) -> Any:
    """`found` (botocore's credentials, or None), whose source's answer of
    keys that expired already is a CredentialRetrievalError: a source failing,
    said and handled as any other (botocore's own check after a refresh
    raises a bare RuntimeError, "the refreshed credentials are still
    expired").  Keys that expired already at start are refreshed now, so a
    start says it as a source that fails would; a deferred source (a role:
    no keys until first used) is asked at its first use, as before."""
    fetch = getattr(found, "_refresh_using", None)  # botocore's seam: the refresh its constructor was given
    if not callable(fetch) or getattr(fetch, "unexpired", False):
        return found
    source = str(getattr(found, "method", "") or "the credential source")

    def fetched() -> Any:
        metadata = fetch()
        expiry = metadata.get("expiry_time") if isinstance(metadata, dict) else None
        if expiry is not None and _passed(expiry):
            raise botocore.exceptions.CredentialRetrievalError(
                provider=source, error_msg=f"the credentials it gave expired at {expiry} (its clock or its key "
                "rotation is wrong?)")
        return metadata

    fetched.unexpired = True  # type: ignore[attr-defined]
    found._refresh_using = fetched
    if getattr(found, "_expiry_time", None) is not None and found.refresh_needed(0):  # (never a deferred one)
        found.get_frozen_credentials()
    return found


def _passed(expiry: Any) -> bool:
    try:
        when = expiry if isinstance(expiry, datetime.datetime) else botocore.utils.parse_timestamp(expiry)
    except (ValueError, TypeError, OverflowError):  # botocore's own check decides
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return bool(when <= datetime.datetime.now(datetime.timezone.utc))


def _within(fn: Callable[[], Any], patience: float, asking: _Asking,
            say_waiting: Callable[[], None] | None = None) -> Any:
    """`fn()` (botocore's chain) on a thread, waited for at most `patience`
    seconds (`say_waiting()` after SAY_WAITING_AFTER_S).  After that the
    helper processes botocore started are killed, and the thread, a daemon,
    is abandoned: CredentialsUnreachable naming the source asked (a source
    that does not answer now may answer later)."""
    outcome: list[tuple[Any, BaseException | None]] = []
    thread = threading.Thread(target=_into, args=(fn, outcome), name="lazyfs-credentials", daemon=True)
    thread.start()
    thread.join(SAY_WAITING_AFTER_S if say_waiting is not None else patience)
    if thread.is_alive() and say_waiting is not None:
        say_waiting()
        thread.join(max(0.0, patience - SAY_WAITING_AFTER_S))
    if not outcome:
        _Helpers.kill()
        raise CredentialsUnreachable(f"no AWS credentials within {patience:g} s: {asking.source()} did not answer")
    found, error = outcome[0]
    if error is not None:
        raise error
    return found


def _into(fn: Callable[[], Any], outcome: list[tuple[Any, BaseException | None]]) -> None:
    try:
        outcome.append((fn(), None))
    except BaseException as e:  # handed to the waiting thread
        outcome.append((None, e))


class LateCredentials:
    """The credentials of a mount whose start could not have them, for a
    reason that may pass (`failure` says which; the mount starts offline).
    Until the chain gives some, each use runs it again (within the start's
    bounded wait, one at a time), and refresh_needed() says so: a request
    asks crtcreds' bounded wait for them before it is signed.  The first
    credentials the chain gives are the client's from then on, refreshed
    as botocore refreshes them."""

    def __init__(self, chain: Any, patience: float, failure: CredentialsUnreachable,
                 asking: _Asking | None = None) -> None:
        self.failure = failure
        self._chain = chain  # botocore's CredentialResolver, as the session had it
        self._patience = patience
        self._asking = asking
        self._had: Any = None  # botocore's credentials, once the chain gave some (one assignment)
        self._lock = threading.Lock()  # one run of the chain at a time

    @classmethod
    def stand_in(cls, core: botocore.session.Session, patience: float, failure: CredentialsUnreachable,
                 asking: _Asking) -> None:
        """Make a LateCredentials what `core` resolves (and a client built on it signs with)."""
        late = cls(core.get_component("credential_provider"), patience, failure, asking)
        core.register_component("credential_provider", botocore.credentials.CredentialResolver([_Late(late)]))

    def refresh_needed(self) -> bool:
        had = self._had
        return had is None or bool(getattr(had, "refresh_needed", lambda: False)())

    def get_frozen_credentials(self) -> Any:
        return self._have().get_frozen_credentials()

    def get_deferred_property(self, name: str) -> Callable[[], Any]:
        return lambda: getattr(self._had, name, None)  # (botocore's endpoint rules: never a run of the chain)

    @property
    def method(self) -> str:
        return str(getattr(self._had, "method", "none yet"))

    def source(self) -> str:
        """Where the credentials come from, or the source of the chain asked for them now, in words."""
        had = self._had
        if had is not None:
            return SOURCES.get(str(getattr(had, "method", "")), "")
        return self._asking.source() if self._asking is not None else ANY_SOURCE

    @property
    def access_key(self) -> Any:
        return self._have().access_key

    def _have(self) -> Any:
        with self._lock:
            if self._had is None:
                try:
                    found = _within(lambda: _unexpired(self._chain.load_credentials()), self._patience,
                                    self._asking or _Asking.none())
                except CHAIN_ERRORS as e:
                    raise unavailable(e) from None
                if found is None:
                    raise CredentialsUnreachable(NONE_FOUND)
                log.info("AWS credentials found (%s)", getattr(found, "method", "unknown"))
                self._had = found
            return self._had


class _Late(botocore.credentials.CredentialProvider):
    METHOD = "lazyfs-late"

    def __init__(self, late: LateCredentials) -> None:
        super().__init__()
        self._late = late

    def load(self) -> LateCredentials:
        return self._late


class _Helpers:
    """The credential_process children botocore starts, so that one that
    hangs is killed when the start gives up on it, or at exit (SIGTERM
    during the wait), never left running on its own."""

    started: ClassVar[list[subprocess.Popen[Any]]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()
    registered: ClassVar[bool] = False  # kill() runs at exit

    @classmethod
    def watch(cls, core: botocore.session.Session) -> None:
        for provider in getattr(core.get_component("credential_provider"), "providers", ()):
            if isinstance(provider, botocore.credentials.ProcessProvider):
                provider._popen = cls.popen  # type: ignore[attr-defined]  # botocore's seam: its constructor's popen

    @classmethod
    def popen(cls, *args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        # Its own process group, so that what a helper script starts goes with it.
        child: subprocess.Popen[Any] = subprocess.Popen(*args, start_new_session=True, **kwargs)
        with cls.lock:
            if not cls.registered:
                cls.registered = True
                atexit.register(cls.kill)
            cls.started = [p for p in cls.started if p.poll() is None] + [child]
        return child

    @classmethod
    def kill(cls) -> None:
        with cls.lock:
            for child in cls.started:
                if child.poll() is None:
                    try:
                        os.killpg(child.pid, signal.SIGKILL)
                    except OSError:  # gone meanwhile
                        pass


def may_pass(e: BaseException) -> bool:
    """Whether credentials that could not be had for `e` may be had later with nothing changed (_PASSING)."""
    if isinstance(e, botocore.exceptions.SSLError):  # a certificate refused: configuration
        return False
    if isinstance(e, botocore.exceptions.ClientError):  # STS, for a role: failing, or saying "later"
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or e.response.get("Error", {}).get("Code") in _PASSING_CODES
    return isinstance(e, _PASSING)


def unavailable(e: BaseException) -> AccessDenied:
    """Credentials that could not be had for `e`: CredentialsUnreachable if that may pass."""
    if isinstance(e, AccessDenied):  # said already (no answer in time: CredentialsUnreachable)
        return e
    return unreachable(e) if may_pass(e) else AccessDenied(f"AWS credentials unavailable: {said(e)}")


def unreachable(e: BaseException) -> CredentialsUnreachable:
    if isinstance(e, CredentialsUnreachable):
        return e
    return CredentialsUnreachable(f"AWS credentials unavailable: {said(e)}")
