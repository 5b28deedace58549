"""A key printed outside the log (bake's failures on stdout, doctor's folder
lines, the reason a listing skips a key) is quoted and escaped as log lines
quote it (wording.quoted): a newline, a terminal escape or a line separator
(U+2028, legal in a key) can neither split the line nor pass for its end."""

from __future__ import annotations

from lazyfs import bake, doctor
from lazyfs.namespace import RemoteObject, build_tree

ODD = "m/line\u2028break\x1b[2J.bin"
SHOWN = r'"s3://b/m/line\u2028break\x1b[2J.bin"'


def one_line(text: str) -> bool:
    return text.splitlines() == [text] and "\x1b" not in text


def test_a_bake_failure_line_quotes_the_key_and_keeps_the_cause_on_one_line() -> None:
    line = bake.failed_line(f"s3://b/{ODD}", "access denied\nto it")
    assert one_line(line), line
    assert line == f"lazyfs bake: failed: {SHOWN}: access denied\\nto it"


def test_doctor_quotes_the_folder_it_lists() -> None:
    tree = build_tree([RemoteObject(bucket="b", key="m/x.bin", size=2048, etag="e", mtime_ns=1)])
    line = doctor.folder("s3://b/m/line\u2028break\n/", tree).line()
    assert one_line(line), line
    assert line.startswith(r'ok    folder "s3://b/m/line\u2028break\n/": 1 object'), line


def test_a_doctor_line_stays_one_line_whatever_its_detail_holds() -> None:
    line = doctor.Check(doctor.FAIL, "bucket b", "no such key 'a\nb'", "check it").line()
    assert one_line(line) and line.endswith(r"no such key 'a\nb' -> fix: check it"), line


def test_a_key_skipped_for_another_keys_path_names_that_key_quoted() -> None:
    objs = [RemoteObject(bucket=b, key="m/line\u2028break.bin", size=1, etag="e", mtime_ns=1) for b in ("b", "c")]
    [skipped] = build_tree(objs).skipped
    assert skipped.reason == r'same path as "s3://b/m/line\u2028break.bin", which is kept'
    assert one_line(skipped.reason)


def test_a_bake_failure_line_names_the_file_once() -> None:
    line = bake.failed_line("s3://b/m/k.bin", 'access denied to "s3://b/m/k.bin" (AccessDenied: no)')
    assert line == 'lazyfs bake: failed: "s3://b/m/k.bin": access denied to it (AccessDenied: no)'
