"""End to end: a store that fills, opened by many readers at once.  The files
that fit are served whole; the ones that do not are refused before a byte
of them is fetched, not failed part-way by the ones admitted beside them."""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path
from typing import Callable

import pytest

from support.filesystems import mounted_tmpfs
from support.mounting import FS, on_both_clients

pytestmark = [pytest.mark.fuse, on_both_clients]

P = "models/room"
MiB = 1024 * 1024


def read_together(fs: FS, files: dict[str, bytes], path: Callable[[int, str], Path],
                  timeout: float) -> dict[str, object]:
    """Read every file at once (the i-th at `path(i, key)`): per key, whether
    its bytes were right, or the errno's name its read failed with."""
    reads = {key: fs.start(functools.partial(Path.read_bytes, Path(path(i, key)))) for i, key in enumerate(files)}
    outcomes: dict[str, object] = {}
    for key, r in reads.items():
        try:
            outcomes[key] = r.result(timeout=timeout) == files[key]
        except OSError as e:
            outcomes[key] = errno.errorcode.get(e.errno or 0, e.errno)
    return outcomes


@pytest.mark.log_errors("needs .* but the store")
def test_parallel_opens_on_a_nearly_full_store_fail_only_before_a_byte_is_fetched(mount, proxy, s3, bucket, fs: FS,
                                                                                  tmp_path: Path):
    """Six files of 4 MiB (below the size whose download file used to get
    its blocks up front) opened together on a 12 MiB store: each download
    admitted counted the same free space, and all but two failed part-way
    with ENOSPC ("cannot write it to the store") after fetching bytes."""
    files = {f"{P}/f{i}.bin": os.urandom(4 * MiB) for i in range(6)}
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    with mounted_tmpfs(tmp_path / "store", "size=12m,mode=0700", "this test") as store:
        m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "1MiB", store=store)
        try:
            outcomes = read_together(fs, files, lambda i, key: m.file(key), timeout=60)
            served = [key for key, o in outcomes.items() if o is True]
            assert len(served) >= 2, outcomes  # two fit in 12 MiB
            for key, o in outcomes.items():
                assert o is True or (o == "ENOSPC" and proxy.count("GET", key) == 0), (key, outcomes)
            assert "cannot write it to the store" not in m.log()
        finally:
            m.stop()


@pytest.mark.log_errors("needs .* but the store")
def test_two_mounts_on_one_nearly_full_store_count_each_others_downloads(mount, proxy, s3, bucket, fs: FS,
                                                                        tmp_path: Path):
    """Another process's downloads take their room in the filesystem too
    (their blocks allocated up front): two mounts of one store, three opens
    each, and still only what fits is fetched."""
    files = {f"{P}/g{i}.bin": os.urandom(4 * MiB) for i in range(6)}
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    with mounted_tmpfs(tmp_path / "store", "size=12m,mode=0700", "this test") as store:
        mounts = [mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "1MiB", store=store) for _ in range(2)]
        try:
            outcomes = read_together(fs, files, lambda i, key: mounts[i % 2].file(key), timeout=60)
            assert sum(o is True for o in outcomes.values()) >= 2, outcomes
            for key, o in outcomes.items():
                assert o is True or (o == "ENOSPC" and proxy.count("GET", key) == 0), (key, outcomes)
            assert not any("cannot write it to the store" in m.log() for m in mounts)
        finally:
            for m in mounts:
                m.stop()


@pytest.mark.log_errors("needs .* but the store")
def test_files_opened_together_on_a_tmpfs_store_are_served_as_far_as_they_fit(mount, proxy, s3, bucket, fs: FS,
                                                                             tmp_path: Path):
    """tmpfs takes a fallocate's pages one at a time and gives them all back
    when it runs out: four files of 24 MiB opened at once on a 60 MiB store
    allocated side by side, and the ones refused took down the one that
    would have fitted beside the first (one served, not two; "needs 24 MiB
    but the store has 36 MiB free")."""
    files = {f"{P}/h{i}.bin": os.urandom(24 * MiB) for i in range(4)}
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    with mounted_tmpfs(tmp_path / "store", "size=60m,mode=0700", "this test") as store:
        m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
        try:
            fs.listdir(m.path / P)
            st = os.statvfs(store)
            fits = st.f_bavail * st.f_frsize // (24 * MiB)
            assert fits == 2, fits
            outcomes = read_together(fs, files, lambda i, key: m.file(key), timeout=90)
            assert sorted(map(str, outcomes.values())) == ["ENOSPC", "ENOSPC", "True", "True"], outcomes
            for key, o in outcomes.items():
                assert o is True or proxy.count("GET", key) == 0, (key, outcomes)
            refused = [ln for ln in m.log().splitlines() if "needs 24.0 MiB but the store" in ln]
            assert len(refused) == 2 and all(_free_said(ln) < 24 * MiB for ln in refused), refused
        finally:
            m.stop()


def _free_said(line: str) -> float:
    """The free space a refusal line names ("... has 12.0 MiB free ..."), in bytes."""
    return float(line.split(" has ", 1)[1].split(" MiB", 1)[0]) * MiB
