"""The botocore session a process's client is built on: a data loader that
skips botocore's start-up scan of its 400+ service folders, and the
credentials resolved once, at start, within a bounded wait, with each way
they can be missing turned into a lazyfs error a user can act on.  The only
other module (with remote.py) that imports botocore."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import threading
from typing import Any, ClassVar

import botocore.credentials
import botocore.exceptions
import botocore.loaders
import botocore.session

from lazyfs.config import RemoteConfig
from lazyfs.errors import AccessDenied, ConfigError

log = logging.getLogger(__name__)

# botocore's errors for credentials it could not get (a source misconfigured,
# failing or refusing): the credentials' fault, as a refusal is.
NO_CREDENTIALS = (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError,
                  botocore.exceptions.CredentialRetrievalError, botocore.exceptions.MetadataRetrievalError,
                  botocore.exceptions.InvalidConfigError, botocore.exceptions.RefreshWithMFAUnsupportedError,
                  botocore.exceptions.TokenRetrievalError, botocore.exceptions.SSOError,
                  botocore.exceptions.UnknownCredentialError, botocore.exceptions.ConfigParseError)
# A start-up wait for credentials still unanswered after this long is said so in one line.
SAY_WAITING_AFTER_S = 1.0

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


def session(cfg: RemoteConfig) -> botocore.session.Session:
    """A botocore session with our loader and its credentials resolved, or
    the reason there are none as a lazyfs error: a profile that does not
    exist is a configuration error (exit 2); a source that fails, is
    misconfigured or does not answer within `connect_timeout +
    read_timeout` (a hung credential_process), AccessDenied (exit 1).  No
    credentials at all is not an error here: the first request says so."""
    try:
        core = botocore.session.get_session()
        core.register_component("data_loader", _QuickLoader.for_session(core))
        # botocore parses every timestamp with dateutil: three quarters of the
        # CPU a 1000-key listing costs.  We read one field and parse it ourselves.
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
        _Helpers.watch(core)
        _resolve_credentials(core, cfg.connect_timeout + cfg.read_timeout)
    except botocore.exceptions.ProfileNotFound as e:
        raise ConfigError(f"AWS profile {e.kwargs.get('profile', '')!r} is not defined in ~/.aws/config or "
                          "~/.aws/credentials (AWS_PROFILE, AWS_CONFIG_FILE)") from None
    except (*NO_CREDENTIALS, OSError) as e:
        raise unavailable(e) from None
    return core


def _resolve_credentials(core: botocore.session.Session, patience: float) -> None:
    """botocore's chain, run on a thread (a credential_process or an
    endpoint may never answer): the session keeps what it finds.  A line
    after SAY_WAITING_AFTER_S says what the start waits for; after
    `patience`, the helper processes botocore started are killed."""
    outcome: list[BaseException | None] = []
    thread = threading.Thread(target=_into, args=(core.get_credentials, outcome), name="lazyfs-credentials",
                              daemon=True)
    thread.start()
    thread.join(SAY_WAITING_AFTER_S)
    if thread.is_alive():
        profile = core.get_config_variable("profile")
        log.info("waiting for AWS credentials%s (at most %g s)", f" of profile {profile!r}" if profile else "",
                 patience)
        thread.join(max(0.0, patience - SAY_WAITING_AFTER_S))
    if not outcome:
        _Helpers.kill()
        raise AccessDenied(f"no AWS credentials within {patience:g} s: the credential source (a "
                           "credential_process, a container or instance endpoint) did not answer")
    if outcome[0] is not None:
        raise outcome[0]


def _into(fn: Any, outcome: list[BaseException | None]) -> None:
    try:
        fn()
        outcome.append(None)
    except BaseException as e:  # handed to the waiting thread
        outcome.append(e)


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


def said(e: BaseException) -> str:
    """An exception's text on one line, without the newline a helper's stderr ends in."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return " ".join(str(e).split()) or type(e).__name__


def unavailable(e: BaseException) -> AccessDenied:
    return AccessDenied(f"AWS credentials unavailable: {said(e)}")
