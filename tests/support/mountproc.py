"""Run `lazyfs mount` as a subprocess, the way a user starts it, and always
clean up: SIGTERM, then fusermount3 -u, then -uz, then SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence


def is_mounted(path: str | Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[1].replace("\\040", " ") == target for line in f)


def force_unmount(path: str | Path) -> None:
    for args in (["fusermount3", "-u"], ["fusermount3", "-uz"], ["umount", "-l"]):
        if not is_mounted(path):
            return
        subprocess.run(args + [str(path)], capture_output=True, timeout=30)
        time.sleep(0.05)


class MountFailed(RuntimeError):
    pass


class MountProcess:
    def __init__(self, mountpoint: str | Path, args: Sequence[str], env: dict[str, str],
                 log_path: str | Path, python: str = sys.executable, wrapper: Sequence[str] = ()) -> None:
        self.mountpoint = Path(mountpoint)
        # A command the daemon runs under (e.g. setpriv dropping capabilities).
        self.wrapper = list(wrapper)
        self.args = list(args)
        self.env = env
        self.log_path = Path(log_path)
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_lines: list[str] = []
        self._ready = threading.Event()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> MountProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, self.python, "-m", "lazyfs", "mount", str(self.mountpoint), *self.args],
            stdout=subprocess.PIPE, stderr=log, env=self.env, start_new_session=True)
        log.close()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.05):
                return self
            if self.proc.poll() is not None:
                time.sleep(0.1)
                raise MountFailed(f"lazyfs exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        self.cleanup()
        raise MountFailed(f"lazyfs was not ready within {timeout} s:\n{self.log()[-3000:]}")

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                self.stdout_lines.append(line)
                if line.startswith("lazyfs: ready"):
                    self._ready.set()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send `sig` and wait; the return code, or None if it did not exit."""
        if self.proc is None:
            return None
        self.send(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL, as a crash would; the mount is left behind (stale)."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def cleanup(self) -> None:
        """Stop whatever is left, in escalating order.  Never raises."""
        try:
            if self.alive():
                self.stop(signal.SIGTERM, timeout=10)
            force_unmount(self.mountpoint)
            if self.alive():
                assert self.proc is not None
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            force_unmount(self.mountpoint)
        except Exception:  # teardown must go on
            pass
