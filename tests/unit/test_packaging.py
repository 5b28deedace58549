"""The installed product is lazyfs alone: no test, benchmark or demo tooling
rides along in the wheel (and so in every container image)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_only_the_lazyfs_package(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--quiet", "--wheel-dir", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("lazyfs-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    product = [n for n in names if not n.startswith("lazyfs-")]  # minus the .dist-info
    assert product and all(n.startswith("lazyfs/") and n.endswith((".py", "py.typed")) for n in product), \
        [n for n in product if not (n.startswith("lazyfs/") and n.endswith(".py"))]
    assert not any("/testing/" in n or "bench" in n or n.endswith(".js") for n in names)
    assert "lazyfs/cli.py" in product
