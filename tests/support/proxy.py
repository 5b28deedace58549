"""A real HTTP proxy between lazyfs and the S3 server, on loopback, in its
own process.

It records every request (so tests can count GETs, LISTs and bytes) and can
inject faults per request or per key: error statuses (500/503/SlowDown/403/
404), a connection reset before any answer (`drop`: an endpoint nothing
answers behind, unreachable, where an error status is an answer), a
connection reset mid-body, a stalled body, a body shorter than its
Content-Length, corrupted bytes of the right length, a first-byte delay, a
body sent at a set rate (a slow link), and replacing the object upstream just before forwarding (a new ETag between two
ranged GETs).  It can also play a server (or a cache, a gateway in front of one) that answers something else than
asked: request headers it ignores (`ignore`: Range, answered 200 with the whole object; If-Match, answered by
whatever version the key holds), or another range than asked (`shift`, with its own true Content-Range).  A fault
applies to the next `times` matching requests, and with `lasts` only for that many seconds (a 404 for a while).
Apart from the faults, a link rate (`S3Proxy.link`) caps the bytes per second of all response bodies together: a
slow link every connection shares, as a `tc tbf` on a real one (a `throttle` fault paces each request on its own).

It runs in a separate process because a test that reads a mount through mmap
holds its interpreter's GIL during the page fault: a proxy thread in the same
process could then never answer the fetch that the fault is waiting for.
Tests drive it through `S3Proxy`, which talks to a control path on the proxy
itself (`/__proxy__/...`).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_PIECE = 64 * 1024
_CONTROL = "/__proxy__/"


@dataclass
class Request:
    method: str
    bucket: str
    key: str
    query: dict[str, str]
    range: str
    if_match: str = ""  # the If-Match header, as sent
    access_key: str = ""  # the access key id the request is signed with (its Authorization header)
    status: int = 0
    body_bytes: int = 0
    fault: str = ""
    at: float = field(default_factory=time.time)  # arrival, on the machine's clock

    def range_start(self) -> int:
        """The first byte a ranged GET asks for (0 without a Range)."""
        if self.range.startswith("bytes="):
            return int(self.range[6:].split("-", 1)[0] or 0)
        return 0

    @property
    def kind(self) -> str:
        """GET, HEAD, PUT...; a GET on a bucket (no key) is a LIST."""
        if self.method == "GET" and not self.key:
            return "LIST"
        return self.method


@dataclass
class Fault:
    # status | drop | reset | stall | short | corrupt | delay | throttle | replace | ignore | shift | answer | listbody
    kind: str
    method: str | None = "GET"
    key: str | None = None  # None: any key
    times: int | None = 1  # None: every matching request
    skip: int = 0  # let this many matching requests through first
    min_offset: int | None = None  # only ranged GETs starting at or after this byte
    query: dict[str, str] | None = None  # only requests with these query parameters
    status: int = 503
    code: str = "SlowDown"
    after: int = 0  # body bytes sent before the fault hits (short: bytes left out)
    seconds: float = 0.0
    rate: float = 0.0  # throttle: body bytes per second
    body_b64: str = ""  # replace: the object's new content
    # replace: leave the object as it is and answer as if it had been replaced: the new content is put under
    # proxy-scratch/<key> and the request answered from there (a HEAD then says another version, while GETs
    # already asked, or still to come, meet the listed one: no race with them).
    elsewhere: bool = False
    # Request headers not forwarded, as by a server that ignores them ("Range", "If-Match"); with any kind.
    ignore: list[str] = field(default_factory=list)
    shift: int = 0  # shift: the Range forwarded starts (and ends) this many bytes later than asked
    # answer: not forwarded; answered with `status`, these headers and body_b64 as the body (a proxy's error page,
    # a body it re-encoded).  Content-Length is the body's unless given (a HEAD's: the length it claims).
    headers: dict[str, str] = field(default_factory=dict)
    # Only for this many seconds from when the proxy got the fault (0: until spent or cleared): a store that
    # answers 404 for a while for an object its listing names (SeaweedFS after a link flap), an outage.
    lasts: float = 0.0
    # listbody: the answer's body rewritten (a store or proxy answering LIST wrongly): every match of the
    # regular expression `pattern` replaced by `repl` (re.sub), or without a pattern the whole body replaced by
    # body_b64; Content-Type set to `content_type` when given.  Match LISTs with query={"list-type": "2"}.
    pattern: str = ""
    repl: str = ""
    content_type: str = ""
    added: float = 0.0  # (set by the proxy: time.monotonic() when it got the fault)
    seen: int = 0
    hits: int = 0

    def take(self, req: Request) -> bool:
        if self.method is not None and req.method != self.method:
            return False
        if req.kind == "LIST" and self.key is not None:
            return False
        if self.key is not None and self.key != req.key:
            return False
        if self.min_offset is not None and req.range_start() < self.min_offset:
            return False
        if self.query is not None and any(req.query.get(k) != v for k, v in self.query.items()):
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        if self.lasts and time.monotonic() - self.added > self.lasts:
            return False
        self.seen += 1
        if self.seen <= self.skip:
            return False
        self.hits += 1
        return True


class _State:
    def __init__(self, upstream: str) -> None:
        u = urllib.parse.urlsplit(upstream)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.link = _Link()

    def take_fault(self, req: Request) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.take(req):
                    return f
        return None


class _Link:
    """One link every response body shares, at `rate` bytes per second (0: unlimited).

    Each piece a connection sends takes its turn on the link: a sender reserves
    the next free slot and waits for it, so N connections sending at once get
    about rate / N each (round robin, one piece per turn)."""

    def __init__(self) -> None:
        self.rate = 0.0
        self._free_at = 0.0  # time.monotonic() when the link is next free
        self._lock = threading.Lock()

    def set(self, rate: float) -> None:
        with self._lock:
            self.rate = rate
            self._free_at = 0.0

    def wait_turn(self, nbytes: int) -> None:
        with self._lock:
            if self.rate <= 0:
                return
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


class _Handler(BaseHTTPRequestHandler):
    state: _State
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith(_CONTROL):
            self._control()
        else:
            self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    # -- control -----------------------------------------------------------------

    def _control(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        what = self.path[len(_CONTROL):]
        st = self.state
        with st.lock:
            if what == "requests":
                out: Any = [asdict(r) | {"kind": r.kind} for r in st.requests]
            elif what == "faults" and self.command == "POST":
                st.faults.append(Fault(**body | {"added": time.monotonic()}))
                out = {"ok": True}
            elif what == "faults":
                out = [asdict(f) for f in st.faults]
            elif what == "clear-faults":
                st.faults.clear()
                out = {"ok": True}
            elif what == "clear":
                st.faults.clear()
                st.requests.clear()
                st.link.set(0.0)
                out = {"ok": True}
            elif what == "link" and self.command == "POST":
                st.link.set(float(body["rate"]))
                out = {"ok": True}
            else:
                out = {"error": what}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # -- proxying -------------------------------------------------------------------

    def _proxy(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        parts = split.path.lstrip("/").split("/", 1)
        req = Request(method=self.command, bucket=urllib.parse.unquote(parts[0]),
                      key=urllib.parse.unquote(parts[1]) if len(parts) > 1 else "",
                      query=dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True)),
                      range=self.headers.get("Range", ""), if_match=self.headers.get("If-Match", ""),
                      access_key=_access_key(self.headers.get("Authorization", "")))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fault = self.state.take_fault(req)
        req.fault = fault.kind if fault else ""
        with self.state.lock:
            self.state.requests.append(req)
        path = self.path
        if fault is not None and fault.kind == "replace":
            target = f"proxy-scratch/{req.key}" if fault.elsewhere else req.key
            self._replace(req.bucket, target, base64.b64decode(fault.body_b64))
            if fault.elsewhere:
                path = urllib.parse.urlunsplit(split._replace(
                    path=f"/{urllib.parse.quote(req.bucket)}/{urllib.parse.quote(target)}"))
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.seconds)
        if fault is not None and fault.kind == "status":
            self._error(req, fault.status, fault.code)
            return
        if fault is not None and fault.kind == "answer":
            self._answer(req, fault)
            return
        if fault is not None and fault.kind == "drop":
            self._abort()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if fault is not None:
            headers = _as_misread(headers, fault)
        status, resp_headers, data = self._upstream(self.command, path, body, headers)
        if fault is not None and fault.kind == "listbody":
            resp_headers, data = _rewritten(resp_headers, data, fault)
        req.status = status
        self.send_response(status)
        for name, value in resp_headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self._send_body(req, data, fault)

    def _replace(self, bucket: str, key: str, data: bytes) -> None:
        """Overwrite the object upstream (a signed PUT: the server checks)."""
        from support.s3server import s3_client

        s3_client(f"http://{self.state.host}:{self.state.port}").put_object(Bucket=bucket, Key=key, Body=data)

    def _upstream(self, method: str, path: str, body: bytes | None,
                  headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.state.host, self.state.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            # A HEAD has no body: its Content-Length is the object's (or the
            # part's, with ?partNumber=), passed on as the server sent it.
            keep_length = method == "HEAD"
            out = [(k, v) for k, v in resp.getheaders()
                   if k.lower() not in _HOP and (keep_length or k.lower() != "content-length")]
            if not keep_length:
                out.append(("Content-Length", str(len(data))))
            return resp.status, out, data
        finally:
            conn.close()

    def _send_body(self, req: Request, data: bytes, fault: Fault | None) -> None:
        kind = fault.kind if fault else ""
        if kind == "corrupt":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        limit = len(data)
        if kind in ("reset", "stall"):
            limit = min(len(data), fault.after)  # type: ignore[union-attr]
        elif kind == "short":
            limit = max(0, len(data) - max(1, fault.after))  # type: ignore[union-attr]
        sent = 0
        try:
            while sent < limit:
                piece = data[sent:min(limit, sent + _PIECE)]
                self.state.link.wait_turn(len(piece))
                self.wfile.write(piece)
                sent += len(piece)
                if kind == "throttle":
                    self.wfile.flush()
                    time.sleep(len(piece) / fault.rate)  # type: ignore[union-attr]
            self.wfile.flush()
            req.body_bytes = sent
            if kind == "stall":
                time.sleep(fault.seconds)  # type: ignore[union-attr]
            if kind in ("reset", "stall", "short"):
                self._abort()
        except (BrokenPipeError, ConnectionResetError):
            req.body_bytes = sent
            self.close_connection = True

    def _abort(self) -> None:
        """Close with a TCP reset: SO_LINGER with a zero timeout."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _answer(self, req: Request, fault: Fault) -> None:
        req.status = fault.status
        body = base64.b64decode(fault.body_b64)
        self.send_response(fault.status)
        for name, value in fault.headers.items():
            self.send_header(name, value)
        if not any(k.lower() == "content-length" for k in fault.headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            req.body_bytes = len(body)

    def _error(self, req: Request, status: int, code: str) -> None:
        req.status = status
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected by the test proxy</Message><Key>{req.key}</Key></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _rewritten(headers: list[tuple[str, str]], data: bytes, fault: Fault) -> tuple[list[tuple[str, str]], bytes]:
    data = (re.sub(fault.pattern.encode(), fault.repl.encode(), data) if fault.pattern
            else base64.b64decode(fault.body_b64))
    kept = [(k, v) for k, v in headers if k.lower() != "content-length"
            and not (fault.content_type and k.lower() == "content-type")]
    extra = [("Content-Type", fault.content_type)] if fault.content_type else []
    return [*kept, *extra, ("Content-Length", str(len(data)))], data


def _as_misread(headers: dict[str, str], fault: Fault) -> dict[str, str]:
    """The request as a server that misreads it takes it: without the headers
    it ignores, and (`shift`) for a range `fault.shift` bytes later.  moto
    checks no signature, so the signed headers can change."""
    ignored = {h.lower() for h in fault.ignore}
    out = {k: v for k, v in headers.items() if k.lower() not in ignored}
    if fault.kind == "shift":
        for k, v in out.items():
            if k.lower() == "range" and v.startswith("bytes="):
                first, _, last = v[6:].partition("-")
                out[k] = f"bytes={int(first) + fault.shift}-{int(last) + fault.shift}"
    return out


def _access_key(authorization: str) -> str:
    """`AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/s3/aws4_request, ...` -> AKID."""
    _, found, rest = authorization.partition("Credential=")
    return rest.split("/", 1)[0] if found else ""


def serve(upstream: str, port: int) -> None:
    class Handler(_Handler):
        state = _State(upstream)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


def _child_env() -> dict[str, str]:
    """The proxy process's environment: no HTTP proxies of the caller, and this
    folder's parent on the path so `python -m support.proxy` finds itself."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    return env


class S3Proxy:
    """The test side: starts the proxy process and reads or steers it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.endpoint = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> S3Proxy:
        self._proc = subprocess.Popen([sys.executable, "-m", "support.proxy", "--upstream",
                                       self.upstream], stdout=subprocess.PIPE, start_new_session=True,
                                      env=_child_env())
        assert self._proc.stdout is not None
        ready: list[bytes] = []
        t = threading.Thread(target=lambda: ready.append(self._proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        t.start()
        t.join(timeout)
        if not ready or not ready[0].strip():
            self.stop()
            raise RuntimeError("the S3 proxy did not start")
        self.endpoint = f"http://127.0.0.1:{int(ready[0])}"
        return self

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(10)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None

    def __enter__(self) -> S3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, what: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.endpoint + _CONTROL + what, data=data,
                                     method="POST" if data is not None else "GET")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def requests(self, kind: str | None = None, key: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self._call("requests")
                if (kind is None or r["kind"] == kind) and (key is None or r["key"] == key)]

    def count(self, kind: str | None = None, key: str | None = None) -> int:
        return len(self.requests(kind, key))

    def bytes_sent(self, key: str | None = None) -> int:
        return sum(r["body_bytes"] for r in self.requests("GET", key))

    def add(self, fault: Fault) -> None:
        self._call("faults", asdict(fault))

    def link(self, rate: float) -> None:
        """Cap all response bodies together at `rate` bytes per second (0: no cap)."""
        self._call("link", {"rate": rate})

    def faults(self) -> list[Fault]:
        return [Fault(**f) for f in self._call("faults")]

    def clear_faults(self) -> None:
        self._call("clear-faults", {})

    def clear(self) -> None:
        self._call("clear", {})


def main() -> None:
    p = argparse.ArgumentParser(description="counting, fault-injecting S3 proxy for tests")
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    serve(args.upstream, args.port)


if __name__ == "__main__":
    main()
