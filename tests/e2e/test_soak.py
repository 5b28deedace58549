"""A 100-second soak (issue 4's leak check), on the default transfer client:
cold and warm, sequential and random reads, refreshes with new versions and
injected faults; descriptors, threads and RSS must level off."""

from __future__ import annotations

import collections
import errno
import os
import signal
import time
from pathlib import Path

import pytest

from support.mounting import FS, wait_until
from support.proxy import Fault

pytestmark = [pytest.mark.fuse, pytest.mark.slow, pytest.mark.long]

from test_faults import FAST, PART, P, proc_sample  # noqa: E402  (the faults module's helpers)


@pytest.mark.slow
@pytest.mark.timeout(400)
# Faults pile up on a key nobody reads for a while (one every 7 rounds, times=1 each); with
# --retries 2 a download meeting three of them fails, as its readers' EIO below allows.
@pytest.mark.log_errors(r"download of .* failed: object store kept failing \(SlowDown: injected by the test proxy\)")
def test_soak_mixed_load_does_not_leak(mount, proxy, s3, bucket, fs: FS, tmp_path: Path):
    """100 seconds of cold and warm, sequential and random reads, refreshes
    with new versions, and injected faults; descriptors, threads and RSS must
    level off (bounds stated in the asserts)."""
    import random

    rnd = random.Random(7)
    keys = [f"{P}/f{i:02d}.bin" for i in range(12)]
    uploaded: dict[str, list[bytes]] = collections.defaultdict(list)

    def upload(k: str) -> None:
        uploaded[k].append(os.urandom(rnd.randrange(1, 6) * PART + rnd.randrange(PART)))
        s3.put_object(Bucket=bucket, Key=k, Body=uploaded[k][-1])

    for k in keys:
        upload(k)
    m = mount("--prefix", f"s3://{bucket}/{P}", "--part-size", "64KiB", *FAST, "--refresh", "0",
              store=tmp_path / "store")

    def one_round(n: int) -> None:
        if n % 5 == 0:  # new versions, then a refresh
            for k in rnd.sample(keys, 3):
                upload(k)
            m.process.send(signal.SIGHUP)
            time.sleep(0.3)
        if n % 7 == 0:
            proxy.add(Fault(rnd.choice(["reset", "short", "status"]), key=rnd.choice(keys), after=5000,
                            status=503, code="SlowDown", times=1))
        def reader(k: str, random_access: bool) -> bool:
            # Any version uploaded so far is right (the refresh asked for above
            # may land after the reads start, the 0.3 s are no promise), a mix
            # of two never is.
            versions = list(uploaded[k])
            with open(m.file(k), "rb") as f:
                if not random_access:
                    data = f.read()
                    assert data in versions, (f"{k}: read {len(data)} bytes, none of the {len(versions)} versions "
                                              f"(sizes {[len(v) for v in versions]}); prefix of "
                                              f"{[i for i, v in enumerate(versions) if v.startswith(data[:4096])]}")
                    return True
                size = os.fstat(f.fileno()).st_size
                good = [v for v in versions if len(v) == size]
                for _ in range(8):
                    off = rnd.randrange(size)
                    f.seek(off)
                    piece = f.read(4096)
                    good = [v for v in good if v[off:off + 4096] == piece]
                    assert good, f"{k}: {len(piece)} bytes at {off} of {size} match no version of that size"
                return True

        futures = [fs.start(reader, rnd.choice(keys), i % 2 == 0) for i in range(16)]
        for f in futures:
            try:
                assert f.result(timeout=60)
            except OSError as e:
                assert e.errno in (errno.ESTALE, errno.EIO, errno.ENOENT), e

    deadline = time.monotonic() + 100
    n = 0
    samples = []
    while time.monotonic() < deadline:
        one_round(n)
        n += 1
        samples.append(proc_sample(m.process.pid))
    warm = samples[len(samples) // 4]
    end = samples[-1]
    # Open handles and downloads in flight swing the count by 20 or more from
    # one round to the next; a leaked descriptor stays.  So: the count once
    # the load stops must come back to the low of the warm rounds.
    warm_low = min(sample[0] for sample in samples[len(samples) // 4:len(samples) // 2])
    try:
        wait_until(lambda: proc_sample(m.process.pid)[0] <= warm_low + 8, timeout=30, what="descriptors to settle")
    except AssertionError:
        pid = m.process.pid
        held = collections.Counter(os.readlink(f"/proc/{pid}/fd/{fd}").split("[")[0]
                                   for fd in os.listdir(f"/proc/{pid}/fd"))
        raise AssertionError(f"descriptors grew from {warm_low} (warm low) to {sum(held.values())}: "
                             f"{held.most_common(6)}") from None
    assert end[1] <= 64, f"{end[1]} threads"
    assert end[2] <= warm[2] + 40 * 1024, f"RSS grew from {warm[2] >> 10} to {end[2] >> 10} MiB"
    assert "Traceback" not in m.log()
