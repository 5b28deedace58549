"""An endpoint's password (`http://user:password@host`) as lazyfs shows it:
masked in the endpoint's shown form (remote.Remote.endpoint, redact.url) and,
as a last line of defence, in every line that leaves the process
(redact.urls): both log formats, whoever logged it (botocore's debug words
quote a request's URL), the exit line, an object store error's message,
`doctor`'s lines and `status`'s output.  Before, only credential errors went
through the URL pattern, and the endpoint was shown as given."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from lazyfs import cli, redact
from lazyfs.config import RemoteConfig, endpoint
from lazyfs.doctor import FAIL, Check
from lazyfs.errors import BadEndpoint, LazyfsError, RemoteUnavailable
from lazyfs.filestate import FileState
from lazyfs.remote import Remote
from lazyfs.statusreport import Answer, FileStatus, report

PW = "S3cretPW9x"
URL = f"http://admin:{PW}@127.0.0.1:9000"
SHOWN = "http://admin:<redacted>@127.0.0.1:9000"


@pytest.mark.parametrize(("given", "shown"), [
    (URL, SHOWN),
    (f"{URL}/gateway", f"{SHOWN}/gateway"),
    ("https://AKIAEXAMPLE:wJalr/K7MDENG+bPx@minio.local", "https://AKIAEXAMPLE:<redacted>@minio.local"),  # a "/"
    ("http://u:p@ss@host:1", "http://u:<redacted>@host:1"),  # an unescaped "@": where the parsers split
    ("https://:token9@host", "https://:<redacted>@host"),
    ("admin:pw1@host:9000", "admin:<redacted>@host:9000"),  # no scheme: quoted by the error that refuses it
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ("http://127.0.0.1:9000/gw@2", "http://127.0.0.1:9000/gw@2"),  # a port and a path: nothing to mask
    ("http://user@host", "http://user@host"),
    ("localhost:9000", "localhost:9000"),
])
def test_an_endpoint_is_shown_with_its_password_masked(given: str, shown: str) -> None:
    assert redact.url(given) == shown
    if "://" in given:  # (in a line, only a URL: "user:pw@host" there is no endpoint's)
        assert redact.urls(f'at "{given}" and') == f'at "{shown}" and'


def test_a_line_keeps_everything_but_a_urls_password() -> None:
    # (botocore's request URLs escape a key's "@": %40)
    line = (f'Could not connect to the endpoint URL: "{URL}/models/m/model%40v2.bin?x=1" (key model@v2.bin, '
            "http://127.0.0.1:9000/models/a@b, token 1234abcd)")
    assert redact.urls(line) == line.replace(PW, "<redacted>")


def test_the_endpoint_is_shown_masked_and_requests_go_where_it_says(static_keys: None) -> None:
    cfg = RemoteConfig(endpoint_url=URL, region="us-east-1")
    remote = Remote(cfg)
    assert remote.endpoint == SHOWN and remote.endpoint_url == URL  # (the CRT's and doctor's connection: as given)
    assert PW not in repr(cfg)


def test_an_endpoint_refused_is_quoted_masked() -> None:
    with pytest.raises(BadEndpoint) as info:
        endpoint(None, {"AWS_ENDPOINT_URL": f"admin:{PW}@127.0.0.1:9000"})
    assert PW not in str(info.value) and "admin:<redacted>@127.0.0.1:9000" in str(info.value)


def test_an_object_store_error_quoting_botocore_s_words_is_masked() -> None:
    e = RemoteUnavailable(f'"s3://b/k": ConnectionClosedError: ... from endpoint URL: "{URL}/b/k".', key="k")
    assert PW not in str(e) and f"{SHOWN}/b/k" in str(e)


@pytest.mark.parametrize("formatter", [cli.JsonFormatter(), cli.OneLineFormatter("%(levelname)s: %(message)s")],
                         ids=["json", "text"])
def test_every_log_line_is_masked_a_library_s_debug_line_too(formatter: logging.Formatter) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger = logging.getLogger("botocore.endpoint.lazyfs-test-endpoint")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("Sending http request: <AWSPreparedRequest url=%s/b?list-type=2>", URL)
        logging.getLogger("lazyfs.x").addHandler(handler)
        logging.getLogger("lazyfs.x").warning("cannot reach the object store at %s", URL, extra={"source": URL})
    finally:
        logger.removeHandler(handler)
        logging.getLogger("lazyfs.x").removeHandler(handler)
    text = out.getvalue()
    assert PW not in text and text.count("admin:<redacted>@") >= 2, text
    if isinstance(formatter, cli.JsonFormatter):
        assert json.loads(text.splitlines()[1])["source"] == SHOWN


def test_the_exit_line_is_masked(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                  tmp_path: Path) -> None:
    out = str(tmp_path / "lock.json")
    assert cli.main(["lock", "--prefix", "s3://bucket/m", "-o", out, "--endpoint-url", f"admin:{PW}@host"]) == 2
    err = capsys.readouterr().err
    assert PW not in err and "admin:<redacted>@host" in err, err

    def failing(args: object) -> int:
        raise LazyfsError(f"the object store at {URL} said no")

    monkeypatch.setitem(cli._HANDLERS, "lock", failing)
    assert cli.main(["lock", "--prefix", "s3://bucket/m", "-o", out]) == cli.EXIT_RUNTIME
    assert capsys.readouterr().err == f"lazyfs: error: the object store at {SHOWN} said no\n"


def test_doctor_s_lines_are_masked() -> None:
    line = Check(FAIL, "endpoint", f"{URL} unreachable (Connection refused)", "check --endpoint-url").line()
    assert line == f"FAIL  endpoint: {SHOWN} unreachable (Connection refused) -> fix: check --endpoint-url"


@pytest.mark.parametrize("as_json", [False, True])
def test_status_s_output_is_masked(as_json: bool) -> None:
    out = io.StringIO()
    note = f"store /s, object store unreachable (cannot reach the object store at {URL})"
    report(Answer([FileStatus("m/a.json", 2, FileState.CACHED)], note), as_json, out)
    assert PW not in out.getvalue() and SHOWN in out.getvalue(), out.getvalue()
    if as_json:
        assert json.loads(out.getvalue())["files"][0]["path"] == "m/a.json"
