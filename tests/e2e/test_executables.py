"""End to end: programs on the mount.  S3 keeps no mode, so files show
`--file-mode` (default 0444, read-only: running one is EACCES, as before);
`--file-mode 0555` runs binaries and scripts from the mount; a local copy
that is executable (prebaked, or baked with `--file-mode`) keeps its execute
bits through the mount, so an image runs the same with and without it.

Before: every file showed 0444 whatever its copy's mode, so `exec` of any
program on the mount failed (exit 126), and `bake` wrote no execute bit."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

from support.mounting import FS, lazyfs_cli, wait_until

pytestmark = pytest.mark.fuse

P = "apps/a"
SCRIPT = b"#!/bin/sh\necho ran \"$@\"\n"
TRUE = Path(shutil.which("true") or "/bin/true").read_bytes()


def put_app(s3, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key=f"{P}/run.sh", Body=SCRIPT)
    s3.put_object(Bucket=bucket, Key=f"{P}/bin/true", Body=TRUE)
    s3.put_object(Bucket=bucket, Key=f"{P}/data.txt", Body=b"data")


def run(fs: FS, path: Path, *args: str):
    return fs.sh("timeout", "20", str(path), *args, timeout=30)


def can_execute(fs: FS, path: Path) -> bool:
    return bool(fs.run(os.access, str(path), os.X_OK))


def test_file_mode_0555_runs_binaries_and_scripts_from_the_mount(mount, s3, bucket, fs: FS, tmp_path: Path):
    put_app(s3, bucket)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--file-mode", "0555", store=tmp_path / "store")
    script, binary = m.file(f"{P}/run.sh"), m.file(f"{P}/bin/true")
    assert stat.S_IMODE(fs.stat(script).st_mode) == 0o555 and can_execute(fs, script)
    res = run(fs, script, "here")
    assert (res.returncode, res.stdout) == (0, "ran here\n"), res.stderr
    assert run(fs, binary).returncode == 0
    # The copies fetched into the store are executable too: the same without the mount.
    assert stat.S_IMODE((tmp_path / "store" / P / "run.sh").stat().st_mode) == 0o500  # --store-mode private


def test_the_default_mode_refuses_to_run_files_but_an_executable_prebaked_copy_runs(
        mount, s3, bucket, fs: FS, tmp_path: Path):
    put_app(s3, bucket)
    store = tmp_path / "store"
    (store / P).mkdir(parents=True)
    (store / P / "run.sh").write_bytes(SCRIPT)  # an image's prebaked copy, executable as its builder made it
    (store / P / "run.sh").chmod(0o755)
    layer = tmp_path / "layer"
    (layer / P / "bin").mkdir(parents=True)
    (layer / P / "bin" / "true").write_bytes(TRUE)  # a --prebaked layer's, owner-only
    (layer / P / "bin" / "true").chmod(0o700)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--prebaked", str(layer), store=store)
    assert fs.listdir(m.path / P) == ["bin", "data.txt", "run.sh"]  # attributes from the listing (readdirplus)
    script, binary, data = m.file(f"{P}/run.sh"), m.file(f"{P}/bin/true"), m.file(f"{P}/data.txt")
    assert stat.S_IMODE(fs.stat(script).st_mode) == 0o555
    assert stat.S_IMODE(fs.stat(binary).st_mode) == 0o544  # execute where its copy has it (and read is given)
    assert stat.S_IMODE(fs.stat(data).st_mode) == 0o444
    res = run(fs, script)
    assert (res.returncode, res.stdout) == (0, "ran\n"), res.stderr
    assert run(fs, binary).returncode == 0
    # A file from S3 with no copy yet shows the default: read-only, as before.
    s3.put_object(Bucket=bucket, Key=f"{P}/other.sh", Body=SCRIPT)
    m2 = mount("--prefix", f"s3://{bucket}/{P}", store=tmp_path / "store2")
    other = m2.file(f"{P}/other.sh")
    assert stat.S_IMODE(fs.stat(other).st_mode) == 0o444 and not can_execute(fs, other)
    with pytest.raises(PermissionError) as refused:
        fs.run(os.execv, str(other), [str(other)])
    assert refused.value.errno == errno.EACCES
    assert run(fs, other).returncode == 126


def test_bake_with_file_mode_makes_an_image_whose_programs_run_with_and_without_the_mount(
        mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    put_app(s3, bucket)
    image = tmp_path / "image"
    res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint, "--to", str(image),
                      "--store-mode", "public", "--file-mode", "0555"])
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE((image / P / "run.sh").stat().st_mode) == 0o555
    assert stat.S_IMODE((image / P / "data.txt").stat().st_mode) == 0o555
    assert fs.sh("timeout", "20", str(image / P / "run.sh"), timeout=30).stdout == "ran\n"
    m = mount("--prefix", f"s3://{bucket}/{P}", mountpoint=image)  # over the image, default --file-mode
    assert stat.S_IMODE(fs.stat(m.file(f"{P}/run.sh")).st_mode) == 0o555
    assert run(fs, m.file(f"{P}/run.sh")).stdout == "ran\n"
    plain = tmp_path / "plain"
    res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint, "--to", str(plain),
                      "--store-mode", "public"])
    assert res.returncode == 0 and stat.S_IMODE((plain / P / "run.sh").stat().st_mode) == 0o444


def test_a_bake_over_a_bake_gives_the_files_already_current_the_mode_it_asks_for(
        mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """A second bake with `--file-mode 0555` said "3 already current" and
    left every file 0444 (exec: Permission denied): the files on disk kept
    the first bake's mode.  The bake's flags describe the result now, both
    ways, and a file a mount fetched that the bake records as baked too."""
    put_app(s3, bucket)
    image = tmp_path / "image"
    files = [image / P / "run.sh", image / P / "bin" / "true", image / P / "data.txt"]

    def bake(to: Path, *flags: str) -> str:
        res = lazyfs_cli(["bake", "--prefix", f"s3://{bucket}/{P}", "--endpoint-url", proxy.endpoint,
                          "--to", str(to), *flags])
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout.splitlines()[-1]

    bake(image, "--store-mode", "public")
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o444}
    again = bake(image, "--store-mode", "public", "--file-mode", "0555")
    assert "0 downloaded" in again and "3 already current (3 given mode 0555)," in again, again
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o555}
    assert fs.sh("timeout", "20", str(files[0]), timeout=30).stdout == "ran\n"
    back = bake(image, "--store-mode", "public")
    assert "3 already current (3 given mode 0444)," in back, back
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o444}
    assert "3 already current, 0 failed" in bake(image, "--store-mode", "public")  # nothing to change
    # A file a mount fetched (private, 0400): the bake makes it its own, with its mode.
    store = tmp_path / "store"
    m = mount("--prefix", f"s3://{bucket}/{P}", store=store)
    fs.read(m.file(f"{P}/run.sh"))
    wait_until(lambda: fs.run(os.getxattr, str(m.file(f"{P}/run.sh")), "user.lazyfs.state") == b"cached",
               what="publication")
    m.stop()
    assert stat.S_IMODE((store / P / "run.sh").stat().st_mode) == 0o400
    claimed = bake(store, "--store-mode", "group", "--file-mode", "0555")
    assert "2 downloaded" in claimed and "1 already current (1 given mode 0550)," in claimed, claimed
    assert {stat.S_IMODE((store / P / n).stat().st_mode) for n in ("run.sh", "bin/true", "data.txt")} == {0o550}
    assert b'"origin":"bake"' in os.getxattr(store / P / "run.sh", "user.lazyfs.identity").replace(b" ", b"")


@pytest.mark.parametrize(("mode", "says"), [("0644", "bits a read-only file cannot have"),
                                             ("4555", "bits a read-only file cannot have"),
                                             ("555x", "not an octal mode"), ("0055", "owner from reading")])
@pytest.mark.parametrize("command", ["mount", "bake"])
def test_a_file_mode_a_read_only_file_cannot_have_exits_2_in_one_line(command: str, mode: str, says: str,
                                                                     tmp_path: Path) -> None:
    where = [str(tmp_path)] if command == "mount" else ["--to", str(tmp_path)]
    res = lazyfs_cli([command, *where, "--prefix", "s3://bkt/x", "--file-mode", mode])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("lazyfs: error: --file-mode") and says in lines[0], lines[0]


def test_a_copy_made_executable_while_mounted_runs_though_the_kernel_cached_it_read_only(
        mount, s3, bucket, fs: FS, tmp_path: Path):
    """The kernel asks for the attributes again before it refuses to run a
    file whose cached mode has no execute bit: that look finds the copy."""
    put_app(s3, bucket)
    layer = tmp_path / "layer"
    (layer / P).mkdir(parents=True)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--prebaked", str(layer), store=tmp_path / "store")
    script = m.file(f"{P}/run.sh")
    assert stat.S_IMODE(fs.stat(script).st_mode) == 0o444  # cached for 5 minutes
    (layer / P / "run.sh").write_bytes(SCRIPT)
    (layer / P / "run.sh").chmod(0o555)
    assert run(fs, script).stdout == "ran\n"
    assert stat.S_IMODE(fs.stat(script).st_mode) == 0o555
