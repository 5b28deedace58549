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
    try:
        try:
            raise RuntimeError("Error when retrieving credentials from custom-process: sts: token revoked\n")
        except RuntimeError:
            logger.warning("Refreshing temporary credentials failed during %s refresh period.", "mandatory",
                           exc_info=True)
    finally:
        logger.removeHandler(handler)
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
