"""A library's log line with a traceback (botocore's failed credential
refresh) reaches lazyfs's log as one line: its message and the exception's."""

from __future__ import annotations

import io
import logging

from lazyfs.cli import LibraryTracebacks, OneLineFormatter


def _logged(name: str) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(LibraryTracebacks())
    handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    # The handler's filter alone: cli.RefreshWarnings, which a setup_logging of an earlier test
    # put on botocore.credentials, makes this line DEBUG (tested below).
    filters, logger.filters = logger.filters, []
    try:
        try:
            raise RuntimeError("Error when retrieving credentials from custom-process: sts: token revoked\n")
        except RuntimeError:
            logger.warning("Refreshing temporary credentials failed during %s refresh period.", "mandatory",
                           exc_info=True)
    finally:
        logger.removeHandler(handler)
        logger.filters = filters
    return out.getvalue()


def test_a_library_s_traceback_becomes_one_line_with_its_cause() -> None:
    text = _logged("botocore.credentials")
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1, text
    assert text.startswith("WARNING botocore.credentials: Refreshing temporary credentials failed during mandatory "
                           "refresh period. (RuntimeError: "), text
    assert "token revoked" in text


def test_lazyfs_s_own_tracebacks_stay() -> None:
    """A bug in lazyfs keeps its traceback (supervise.failed, debug logs)."""
    assert "Traceback" in _logged("lazyfs.runner")


def test_botocore_s_failed_refresh_warning_is_debug(caplog) -> None:
    """Each failed refresh added `WARNING botocore.credentials: Refreshing
    temporary credentials failed ...` (1-3 a failed read) beside lazyfs's own
    WARNING naming the cause, which the README promises as the one line."""
    from lazyfs.cli import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info")
        root.addHandler(caplog.handler)
        logging.getLogger("botocore.credentials").warning(
            "Refreshing temporary credentials failed during %s refresh period.", "mandatory")
        assert not [r for r in caplog.records if r.name == "botocore.credentials"], caplog.text
        setup_logging("debug")
        root.addHandler(caplog.handler)
        logging.getLogger("botocore.credentials").warning(
            "Refreshing temporary credentials failed during %s refresh period.", "mandatory")
        said = [r for r in caplog.records if r.name == "botocore.credentials"]
        assert [r.levelname for r in said] == ["DEBUG"], caplog.text
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
