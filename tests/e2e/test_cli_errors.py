"""The CLI contract for bad input and failures: one line, a documented exit
code, never a traceback (run as a user would, in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.mounting import lazyfs_cli
from support.proxy import Fault
from support.s3server import clean_env, free_port


def one_line_error(res: subprocess.CompletedProcess[str], logged: tuple[str, ...] = ()) -> str:
    """The one error line; `logged`: log lines the README says may come before it."""
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not any(s in ln for s in logged)]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("lazyfs: error: ")
    return lines[0]


CASES = {
    "missing config file": (["--config", "{tmp}/nope.json"], "config file not found"),
    "not JSON": (["--config", "{tmp}/notjson.json"], "not valid JSON"),
    "not an object": (["--config", "{tmp}/array.json"], "must be a JSON object"),
    "no download_files_from": (["--config", "{tmp}/empty.json"], 'missing "download_files_from"'),
    "wrong type": (["--config", "{tmp}/wrongtype.json"], "must be a string, found a number"),
    "near-miss key": (["--config", "{tmp}/typo.json"], 'did you mean "download_files_from"'),
    "empty prefix": (["--config", "{tmp}/emptyprefix.json"], '"download_files_from" is empty'),
    "s3:// without bucket": (["--prefix", "s3:///models/x"], "names no bucket"),
    "no bucket": (["--prefix", "models/x"], "no bucket for"),
    "mountpoint missing": (["{tmp}/no-such-dir", "--prefix", "s3://bkt/x"], "does not exist"),
    "mountpoint is a file": (["{tmp}/afile", "--prefix", "s3://bkt/x"], "is not a directory"),
    "unknown flag": (["--prefix", "s3://bkt/x", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    "bad part size": (["--prefix", "s3://bkt/x", "--part-size", "big"], "is not a size"),
    "bad log level": (["--prefix", "s3://bkt/x", "--log-level", "loud"], "invalid choice"),
    # awscrt refused it inside the mount: "internal error: RuntimeError: 14371", exit 1
    "crt part size over its memory": (["--prefix", "s3://bkt/x", "--transfer-client", "crt", "--part-size", "200MiB"],
                                      "--part-size 200MiB is more than --transfer-client crt takes with "
                                      "--memory-limit 256MiB: at most 128MiB"),
    "part size over S3's largest": (["--prefix", "s3://bkt/x", "--part-size", "99999999999999999999999"],
                                    "is too large (at most 5GiB: S3's largest part)"),
    "read-ahead too large": (["--prefix", "s3://bkt/x", "--read-ahead", "1G"], "--read-ahead 1G must be 0"),
    "read-ahead not in pages": (["--prefix", "s3://bkt/x", "--read-ahead", "3000"], "a multiple of 4KiB up to 16MiB"),
    "nothing to serve": ([], "nothing to serve"),
    # a wrong file is refused unread: a FIFO would block for ever, a checkpoint be read whole
    "config is a FIFO": (["--config", "{tmp}/fifo"], "fifo: is a FIFO (named pipe), not a config file"),
    "config is a device": (["--config", "/dev/null"], "/dev/null: is a character device, not a config file"),
    "config too big": (["--config", "{tmp}/model.safetensors"], "too big for a config file (at most 16 MiB)"),
    "config nested too deeply": (["--config", "{tmp}/deep.json"], "arrays or objects nested too deeply"),
    "download_files_from twice": (["--config", "{tmp}/twice.json"], '"download_files_from" is given twice'),
    "invalid bucket in model.json": (["--config", "{tmp}/badbucket.json"], '"bad!bucket" is not a valid bucket name'),
    "invalid bucket in --prefix": (["--prefix", "s3://bad!bucket/x"], '"bad!bucket" is not a valid bucket name'),
    "invalid --bucket": (["--prefix", "x", "--bucket", "ab"], '--bucket (or LAZYFS_BUCKET): "ab" is not a valid'),
    # a name from a file or argv cannot split the line
    "newline in a folder": (["--config", "{tmp}/newline.json"], r'folder "a\nb/../c" cannot be a path'),
    "newline in a path": (["--config", "{tmp}/no\nsuch.json"], r"no\nsuch.json: config file not found"),
}


@pytest.fixture
def cfgdir(tmp_path: Path) -> Path:
    files = {"notjson.json": "{nope", "array.json": "[]", "empty.json": "{}",
             "wrongtype.json": '{"download_files_from": 7}',
             "typo.json": '{"download_file_from": "a/b"}',
             "emptyprefix.json": '{"download_files_from": ""}',
             "deep.json": "[" * 100_000 + "]" * 100_000,
             "twice.json": '{"download_files_from": "s3://bkt/a", "download_files_from": "s3://bkt/b"}',
             "badbucket.json": '{"download_files_from": "s3://bad!bucket/m"}',
             "newline.json": '{"download_files_from": "s3://bkt/a\\nb/../c"}'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    os.mkfifo(tmp_path / "fifo")
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate((16 << 20) + 1)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "mnt").mkdir()
    return tmp_path


@pytest.mark.parametrize("case", sorted(CASES))
def test_usage_and_config_errors_exit_2(case: str, cfgdir: Path) -> None:
    args, message = CASES[case]
    argv = [a.replace("{tmp}", str(cfgdir)) for a in args]
    if not argv or not argv[0].startswith(str(cfgdir)):
        argv = [str(cfgdir / "mnt")] + argv
    res = lazyfs_cli(["mount", *argv], timeout=30)
    assert res.returncode == 2, (case, res.stderr)
    assert message in one_line_error(res), case


@pytest.mark.parametrize("command", ["bake", "status", "lock"])
@pytest.mark.parametrize("case", ["config is a FIFO", "config too big", "config nested too deeply",
                                  "download_files_from twice", "invalid bucket in model.json"])
def test_every_command_refuses_a_bad_model_json_in_one_line(command: str, case: str, cfgdir: Path) -> None:
    args, message = CASES[case]
    where = {"bake": ["--to", str(cfgdir / "mnt")], "status": ["--store", str(cfgdir / "mnt")],
             "lock": ["--output", "-"]}[command]
    res = lazyfs_cli([command, *where, *(a.replace("{tmp}", str(cfgdir)) for a in args)], timeout=30)
    assert res.returncode == 2, (case, res.stderr)
    assert message in one_line_error(res), case


def test_bake_refuses_a_crt_part_size_its_client_would_refuse_before_it_starts(cfgdir: Path) -> None:
    """It was "internal error: RuntimeError: 14371 (AWS_ERROR_S3_PART_SIZE_EXCEEDS_MEMORY_LIMIT)", exit 1."""
    res = lazyfs_cli(["bake", "--to", str(cfgdir / "mnt"), "--prefix", "s3://bkt/x", "--transfer-client", "crt",
                      "--part-size", "200MiB", "--endpoint-url", f"http://127.0.0.1:{free_port()}"], timeout=30)
    assert res.returncode == 2, res.stderr
    assert one_line_error(res) == (
        "lazyfs: error: --part-size 200MiB is more than --transfer-client crt takes with --memory-limit 256MiB: "
        "at most 128MiB (a quarter of --memory-limit, never under 128MiB); lower --part-size or raise "
        "--memory-limit to 800MiB")
    assert list((cfgdir / "mnt").iterdir()) == [], "it began the bake"


def test_bake_takes_a_larger_crt_part_with_a_memory_limit(s3, bucket: str, proxy, cfgdir: Path) -> None:
    """bake had no --memory-limit ("unrecognized arguments", exit 2), so its CRT parts were at most 128 MiB."""
    data = os.urandom(3 * 1024 * 1024 + 5)
    s3.put_object(Bucket=bucket, Key="m/w.bin", Body=data)
    args = ["bake", "--prefix", f"s3://{bucket}/m", "--endpoint-url", proxy.endpoint, "--transfer-client", "crt",
            "--part-size", "256M"]
    refused = lazyfs_cli([*args, "--to", str(cfgdir / "refused")], timeout=60)
    assert refused.returncode == 2 and "lower --part-size or raise --memory-limit to 1GiB" in one_line_error(refused)
    res = lazyfs_cli([*args, "--memory-limit", "2G", "--to", str(cfgdir / "baked")], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (cfgdir / "baked" / "m" / "w.bin").read_bytes() == data
    assert [r["range"] for r in proxy.requests("GET", "m/w.bin")], "the CRT sent ranged GETs"


def test_bucket_not_found_exits_1(moto, cfgdir: Path) -> None:
    res = lazyfs_cli(["mount", str(cfgdir / "mnt"), "--prefix", "s3://no-such-bucket/x",
                      "--endpoint-url", moto.endpoint])
    assert res.returncode == 1
    assert "bucket no-such-bucket does not exist" in one_line_error(res)


def test_unreachable_endpoint_exits_1_quickly(cfgdir: Path) -> None:
    started = time.monotonic()
    res = lazyfs_cli(["mount", str(cfgdir / "mnt"), "--prefix", "s3://bkt/x",
                      "--endpoint-url", f"http://127.0.0.1:{free_port()}"], timeout=60)
    assert res.returncode == 1
    # botocore retries a refused connection for a few seconds; a start that
    # waits more than one says so first (README, failure table)
    assert "cannot reach the object store" in one_line_error(
        res, logged=("INFO lazyfs.startup: waiting for the object store at ",))
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("code", ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_access_denied_exits_1(proxy, bucket, cfgdir: Path, code: str) -> None:
    proxy.add(Fault("status", method="GET", status=403, code=code, times=None))
    res = lazyfs_cli(["mount", str(cfgdir / "mnt"), "--prefix", f"s3://{bucket}/x",
                      "--endpoint-url", proxy.endpoint])
    assert res.returncode == 1
    line = one_line_error(res)
    assert "access denied" in line and code in line
    assert "testing" not in line.replace("testing/", ""), "credentials must never be printed"


def test_umount_errors(cfgdir: Path) -> None:
    res = lazyfs_cli(["umount", str(cfgdir / "mnt")])
    assert res.returncode == 1 and "is not mounted" in one_line_error(res)
    res = lazyfs_cli(["umount"])
    assert res.returncode == 2


def test_python_m_lazyfs_and_console_script_agree() -> None:
    a = lazyfs_cli(["--help"])
    script = Path(sys.executable).parent / "lazyfs"
    b = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and "mount" in a.stdout and "umount" in a.stdout
    assert lazyfs_cli(["--version"]).stdout.startswith("lazyfs ")


@pytest.mark.parametrize("command", ["mount", "bake", "lock", "status", "doctor"])
def test_a_profiles_endpoint_without_a_scheme_is_a_usage_error_as_the_environments(command: str,
                                                                                   tmp_path: Path) -> None:
    """`endpoint_url = 127.0.0.1:PORT` in the profile: botocore's ValueError
    ended every command as `internal error`, exit 1, where the same value in
    AWS_ENDPOINT_URL_S3 is one line, exit 2."""
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\nregion = us-east-1\nendpoint_url = 127.0.0.1:{free_port()}\n")
    env = clean_env({"AWS_CONFIG_FILE": str(config)})
    (tmp_path / "mnt").mkdir()
    args = {"mount": ["mount", str(tmp_path / "mnt"), "--store", str(tmp_path / "store")],
            "bake": ["bake", "--to", str(tmp_path / "baked")], "lock": ["lock", "--output", str(tmp_path / "l.json")],
            "status": ["status", str(tmp_path)], "doctor": ["doctor", str(tmp_path / "mnt")]}[command]
    res = lazyfs_cli([*args, "--prefix", "s3://bkt/m/"], env=env, timeout=60)
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("lazyfs: error: endpoint \"127.0.0.1:") and "not an http" in line, res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
