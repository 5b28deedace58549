"""Files' permission bits without a kernel: --file-mode, and the execute bits
of the local copy that would be served (the store's first, then the
prebaked layers'), masked to who may read."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from lazyfs.filemodes import FileModes
from lazyfs.layer import STORE_MODES, Layer, exec_bits
from lazyfs.namespace import RemoteObject
from support.enginekit import trio_test


def copy(root: Path, key: str, data: bytes, mode: int) -> None:
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    (root / key).write_bytes(data)
    (root / key).chmod(mode)


def test_execute_bits_follow_who_may_read() -> None:
    assert exec_bits(0o755, 0o444) == 0o111 and exec_bits(0o755, 0o400) == 0o100
    assert exec_bits(0o644, 0o444) == 0 and exec_bits(0o555, 0o440) == 0o110
    assert STORE_MODES["private"].with_exec(0o555).executable == 0o100
    assert STORE_MODES["public"].with_exec(0o444).executable == 0


@trio_test
async def test_a_file_shows_the_execute_bits_of_the_copy_that_would_be_served(tmp_path: Path) -> None:
    store, layer = tmp_path / "store", tmp_path / "layer"
    copy(store, "a/fetched.sh", b"12", 0o400)  # the store's copy comes first, even with one below that runs
    copy(layer, "a/fetched.sh", b"12", 0o755)
    copy(layer, "a/run.sh", b"12", 0o750)
    copy(layer, "a/old.sh", b"1", 0o755)  # not this version's size: not what would be served
    layers = [Layer(os.open(p, os.O_RDONLY | os.O_DIRECTORY), str(p), False, "layer") for p in (store, layer)]
    modes = FileModes(0o444, lambda: layers)
    objs = {name: RemoteObject("b", f"a/{name}", 2, '"e"', 0) for name in ("fetched.sh", "run.sh", "old.sh", "s3")}
    with trio.fail_after(10):
        await modes.learn([*objs.values(), "a folder's node"])
    assert {n: oct(modes.shown(o)) for n, o in objs.items()} == {
        "fetched.sh": "0o444", "run.sh": "0o554", "old.sh": "0o444", "s3": "0o444"}
    assert FileModes(0o555, lambda: layers).shown(objs["s3"]) == 0o555
    # Made executable since: only a look again (the kernel's getattr before it refuses to run it) sees it.
    (store / "a/fetched.sh").chmod(0o500)
    await modes.learn([objs["fetched.sh"]])
    assert modes.shown(objs["fetched.sh"]) == 0o444
    await modes.learn([objs["fetched.sh"]], again=True)
    assert modes.shown(objs["fetched.sh"]) == 0o544
    for one in layers:
        one.close()
