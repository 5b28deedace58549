"""Credential errors as lazyfs says them: one line, with anything that looks
like a secret masked.  botocore's errors for credentials it could not get
carry what their source said: a failing `credential_process`'s whole
stderr, a container endpoint's answer.  Helpers that echo the keys they were
given, or dump the JSON they would have printed, are common; lazyfs never
logs credentials, so every such error it prints or records (its log lines,
exit-1 lines, `status`, stats, `doctor`) is said through `said` here, and
every traceback a log line carries, in either log format, through
`masked_lines` (cli.MaskedFormatter).

What is masked (`masked`): AWS access key ids (their first four characters
kept: `AKIA****`), JWTs, runs of 40 or more base64 characters that look
random (a secret access key is 40, a session token hundreds), and the value
after a key naming a secret, token or password (`"SecretAccessKey": "..."`,
`aws_session_token=...`), a URL's password (`url`, `urls`).  After such a key and only a
space (`password hunter2`, `token x1y2`), or a bare `token:`, the next word is
masked when it is shaped as a value, not a word: three characters or more,
with a digit or a character other than a letter, `-` or `'`, and not a path
(`/`, `~`, `.` first) or a URL (`token expired`, `password for user`, `secret
key`, `token: Token for ...` are prose, kept).  Words, paths, bucket names, hex digests and the
source's reason ("token expired") are kept.  What the source said is capped
at HELPER_CHARS characters.  Pure: no I/O, no lazyfs import.

A URL's password is masked in more than credential errors: an endpoint
(`--endpoint-url`, AWS_ENDPOINT_URL, a profile's endpoint_url) may carry one
(`http://user:password@host`), and botocore's own messages quote the URL of
the request.  The endpoint lazyfs shows is `url`'s form of it (remote.Remote
keeps both); `urls` is the last line of defence where words leave the
process: every log message in either format (cli's formatters), the exit
line, `doctor`, `status` and its JSON, the stats file, an object store
error's message (errors.RemoteError).
"""

from __future__ import annotations

import json
import re
from typing import Any

# What a credential source said (a helper's stderr, an endpoint's answer), at most, once masked.
HELPER_CHARS = 200
# An error whose source's part cannot be told apart, at most.
MESSAGE_CHARS = 400

_B64 = r"A-Za-z0-9+/_\-"  # base64 and base64url
# AWS access key ids (long-term AKIA, temporary ASIA) and the ids of roles and users.
_KEY_ID = re.compile(r"(?<![A-Za-z0-9])(AKIA|ASIA|AROA|AIDA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])")
_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_=-]{7,}(?:\.[A-Za-z0-9_=-]+){0,2}")
_RUN = re.compile(rf"(?<![{_B64}])[{_B64}]{{40,}}={{0,2}}(?![{_B64}=])")
# A key naming a secret: SecretAccessKey, aws_session_token, client_secret, password, token; not a
# word that goes on (tokenizer.json), nor a file of one (web_identity_token_file).
_NAME = (r"(?<![A-Za-z0-9_.-])[A-Za-z0-9_-]*?(?:secret|token|password|passwd)(?:[_-]?(?:access[_-]?)?key|[_-]?id)?"
         r"(?![A-Za-z0-9_.-])")
_QUOTED = re.compile(rf"""(?i)(["']?{_NAME}["']?\s*[:=]\s*)("[^"]*"|'[^']*')""")
# key=value, key: value (unquoted, up to a space or punctuation).  A bare "token: ..." is prose
# ("Error loading SSO Token: Token for ... does not exist"), kept.
_UNQUOTED = re.compile(rf"""(?i)(["']?({_NAME})["']?\s*([:=])\s*)([^\s,;&"'(){{}}\[\]<>]+)""")
# A key naming a secret, then only a space (or a bare "token:"): the next word, if shaped as a value.
_SPACED = re.compile(rf"""(?i)({_NAME}[ \t]+)([^\s,;&"'(){{}}\[\]<>]+)""")
_WORD = re.compile(r"[A-Za-z'-]*")
_SEPARATORS = re.compile(r"[/_-]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s,;\"']+")
# A URL's password (`https://user:password@host`), up to the last "@" before a space or a quote (one with
# a "/" or an unescaped "@" too: where Python's and botocore's parsers split), but not a port and a path
# (`http://host:9000/key@v2`).  An endpoint's, with or without a scheme (a value that is no URL is quoted
# in its error line).
_URL_PASSWORD = re.compile(r"""(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)(?!\d+/)[^\s"'<>]*@""")
_ENDPOINT_PASSWORD = re.compile(r"""(?i)^((?:[a-z][a-z0-9+.-]*://|(?!\S*://))[^/\s:@]*:)(?!\d+/)\S*@""")


def said(e: BaseException) -> str:
    """A credential error's text on one line, masked (`masked`), without the
    colon some of botocore's end in (its container endpoint's: "... retrieve
    container metadata:"); what the source said (botocore's `error_msg`)
    capped at HELPER_CHARS characters, the whole at MESSAGE_CHARS."""
    if isinstance(e, OSError) and e.filename:
        return masked(f"{e.strerror or type(e).__name__}: {e.filename}")
    # Words botocore could not read (awssession.GARBLED): which, besides the decoder's own.
    if isinstance(e, json.JSONDecodeError):
        return f"a credential source's answer is not JSON (a credential_process prints its keys as JSON): {e}"
    if isinstance(e, UnicodeDecodeError):
        return f"a credential source's output is not UTF-8 text ({e})"
    text = one_line(str(e)).rstrip(":") or type(e).__name__
    kwargs = getattr(e, "kwargs", None)
    source = one_line(str(kwargs.get("error_msg") or "")).rstrip(":") if isinstance(kwargs, dict) else ""
    at = text.rfind(source) if source else -1
    if at < 0:
        return capped(masked(text), MESSAGE_CHARS)
    return masked(text[:at]) + capped(masked(source), HELPER_CHARS) + masked(text[at + len(source):])


def masked(text: str) -> str:
    """`text` with every secret-shaped part masked (the module's docstring says which)."""
    text = _QUOTED.sub(lambda m: f"{m[1]}{m[2][0]}<redacted>{m[2][0]}", text)
    text = _UNQUOTED.sub(_unquoted, text)
    text = _BEARER.sub(lambda m: f"{m[1]}<redacted>", text)
    text = _URL_PASSWORD.sub(lambda m: f"{m[1]}<redacted>@", text)
    text = _JWT.sub(_redacted, text)
    text = _KEY_ID.sub(lambda m: f"{m[1]}****", text)
    text = _RUN.sub(lambda m: _redacted(m) if _random(m[0]) else m[0], text)
    return _SPACED.sub(lambda m: _value(m[1], m[2]), text)


def url(endpoint: str) -> str:
    """An endpoint as lazyfs shows it: its password masked (`http://user:<redacted>@host:9000`), the rest kept."""
    return _ENDPOINT_PASSWORD.sub(lambda m: f"{m[1]}<redacted>@", endpoint)


def urls(text: str) -> str:
    """`text` with every URL's password masked (and nothing else: a line's words, keys and paths are kept)."""
    return _URL_PASSWORD.sub(lambda m: f"{m[1]}<redacted>@", text) if "://" in text else text


def urls_in(value: Any) -> Any:
    """`value` (JSON-shaped: a stats file, status's answer) with `urls` applied to every string in it."""
    if isinstance(value, str):
        return urls(value)
    if isinstance(value, dict):
        return {k: urls_in(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [urls_in(v) for v in value]
    return value


def masked_lines(text: str) -> str:
    """`text` of many lines (a traceback: its exceptions' messages carry what a
    credential source said, chained from botocore's), each line masked."""
    return "\n".join(masked(line) for line in text.split("\n"))


def capped(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and "..." (cut at a space when one is near)."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit * 3 // 4 else cut).rstrip() + "..."


def one_line(text: str) -> str:
    return " ".join(text.split())


def _unquoted(m: re.Match[str]) -> str:
    if m[3] == ":" and m[2].lower() == "token":  # prose, unless what follows is shaped as a value
        return _value(m[1], m[4])
    return f"{m[1]}<redacted>"


def _value(before: str, word: str) -> str:
    """`before` and `word`, the word masked if it is shaped as a value (the module's docstring)."""
    core = word.rstrip(".:!?")
    if len(core) < 3 or core.startswith(("/", "~", ".")) or "://" in core or "****" in core or \
            _WORD.fullmatch(core):
        return before + word
    return f"{before}<redacted>{word[len(core):]}"


def _redacted(m: re.Match[str]) -> str:
    return f"<redacted {len(m[0])} chars>"


def _random(run: str) -> bool:
    """Whether a run of base64 characters looks like a key or token, not a
    name: upper and lower case letters and digits, few separators (a path
    or key of words has many; a session token's "//////////" is one), not a
    path from the root."""
    core = run.rstrip("=")
    separators = len(_SEPARATORS.findall(core))
    return (not core.startswith("/") and separators * 10 <= len(core) and any(c.isupper() for c in core)
            and any(c.islower() for c in core) and any(c.isdigit() for c in core))
