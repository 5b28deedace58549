"""Unit tests: a layer's files by descriptor (lazyfs/layer.py)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from lazyfs import layer as layer_module
from lazyfs.layer import Layer


def test_a_file_or_folder_the_layer_may_not_read_is_said_once_then_treated_as_absent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An image built with the wrong owner: its copies cannot be read (root
    reads anything, so the refusal is made here), and every such file is
    fetched from S3 instead; one warning says why, not one per file."""
    for rel in ("m/a.bin", "m/b.bin", "locked/c.bin"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    real_open = os.open

    def refusing(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if path in ("a.bin", "b.bin", "locked"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(layer_module.os, "open", refusing)
    layer = Layer.open(str(tmp_path), writable=False, label="prebaked layer")
    try:
        with caplog.at_level(logging.WARNING, logger="lazyfs.layer"):
            assert layer.open_file("m/a.bin") is None
            assert layer.open_file("m/b.bin") is None
            assert layer.open_file("locked/c.bin") is None
            assert layer.open_file("m/missing.bin") is None
    finally:
        layer.close()
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"prebaked layer {tmp_path}: cannot read m/a.bin (Permission denied); files it cannot read "
                    "are fetched from S3 instead (check the owner and mode of its files; not said again)"]


def test_a_file_standing_where_a_folder_must_be_is_named_by_its_store_path(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A key `ff/m/x` cached as a file, which then became a folder
    (`ff/m/x/inner.bin`): the file is removed to make the folder.  Before,
    the warning named only `"x"`; now the path in the store, as the warning
    of the reverse change does."""
    (tmp_path / "ff" / "m").mkdir(parents=True)
    (tmp_path / "ff" / "m" / "x").write_bytes(b"old file")
    layer = Layer.open(str(tmp_path), writable=True, label="store")
    try:
        with caplog.at_level(logging.WARNING, logger="lazyfs.layer"):
            os.close(layer.open_dir(["ff", "m", "x"], create=True))
    finally:
        layer.close()
    assert (tmp_path / "ff" / "m" / "x").is_dir()
    assert [r.getMessage() for r in caplog.records] == [
        'store: removing "ff/m/x", which stands where a folder must be']
