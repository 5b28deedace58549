"""A reader of one file beside another file's sweep on a slow link: the sweep
held every connection for whole parts, so a reader of a small file (a
config.json opened while a shard downloads) waited for one of those parts to
end, past --read-deadline: EIO for 8 bytes S3 would serve at once (a tester
saw it at 100 KB/s per connection).  The last free connection is kept for
bytes a reader waits for."""

from __future__ import annotations

import os
import subprocess
import time

from support.mounting import FS, wait_until
from support.proxy import Fault

P = "models/m"
CONNECTIONS = 3


def test_a_small_file_reads_while_another_files_sweep_crawls(mount, proxy, s3, bucket, fs: FS, tmp_path) -> None:
    big, small = f"{P}/model.bin", f"{P}/config.json"
    s3.put_object(Bucket=bucket, Key=big, Body=os.urandom(16 << 20))
    s3.put_object(Bucket=bucket, Key=small, Body=b'{"layers": 2}')
    proxy.add(Fault("throttle", key=big, rate=20_000, times=None))  # a 1 MiB part takes ~50 s
    m = mount("--prefix", f"s3://{bucket}/{P}", "--max-connections", str(CONNECTIONS), "--part-size", "1MiB",
              "--read-deadline", "8", "--read-timeout", "60", store=tmp_path / "store")
    fs.listdir(m.path / P)
    # A reader of the big file starts its sweep (a kept file downloads on after the close).
    subprocess.run(["timeout", "30", "head", "-c", "10", str(m.file(big))], capture_output=True, timeout=60)
    wait_until(lambda: proxy.count("GET", big) >= CONNECTIONS - 1, what="the sweep's requests", timeout=30)
    time.sleep(1)  # (time for a request the last connection must not carry)
    assert fs.read(m.file(small), timeout=30) == b'{"layers": 2}'
    assert proxy.count("GET", big) == CONNECTIONS - 1, "the sweep took the last connection"
