"""A loopback HTTP proxy that honours Range, throttles, and records every request.

olah (the local hub) always answers 200 with the whole file; the real hub's CDN
honours Range. Tests put this proxy in front of olah to get CDN behaviour, a
slow link (so a kill -9 lands mid-file), and a count of what was asked and
sent. Bodies are streamed, never held whole.

With `cache_dir`, file downloads (`/resolve/`) are fetched from upstream once,
kept on disk and served from there, as a CDN edge does: benchmarks use it so
olah's own speed (about 27 MB/s, one object read whole into memory per
request) does not stand in for the hub's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2

from ops.net import free_port

_HOP_HEADERS = ("content-length", "transfer-encoding", "content-encoding", "connection", "date", "server")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    authorization: str | None
    bytes_sent: int = 0


@dataclass
class Proxy:
    upstream: str
    rate: float | None = None  # bytes per second per response, None for unthrottled
    total_rate: float | None = None  # bytes per second for all responses together (an origin's egress), None for unthrottled
    port: int = field(default_factory=free_port)
    requests: list[Seen] = field(default_factory=list)
    cache_dir: Path | None = None
    _fills: dict[str, threading.Lock] = field(default_factory=dict)
    _fills_lock: threading.Lock = field(default_factory=threading.Lock)
    _link_free: float = 0.0  # when the shared link can send its next byte (total_rate)
    _link_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bytes_served(self, path_part: str = "") -> int:
        return sum(r.bytes_sent for r in self.requests if path_part in r.path)

    def start(self) -> Proxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                seen = Seen(self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization"))
                proxy.requests.append(seen)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "accept", "user-agent")}
                if proxy.cache_dir and body and "/resolve/" in self.path:
                    self._serve_cached(proxy._cached(self.path, headers), seen)
                    return
                with httpx2.stream(self.command, proxy.upstream + self.path, headers=headers, follow_redirects=True, timeout=600) as r:
                    length = r.headers.get("content-length")
                    if length is None:  # olah streams chunked; its HEAD knows the length
                        length = httpx2.head(proxy.upstream + self.path, headers=headers, follow_redirects=True, timeout=60).headers.get("content-length", 0)
                    total = int(length)
                    m = _RANGE.match(seen.range or "")
                    start, end, status = 0, total, r.status_code
                    if m and status == 200:
                        start, end, status = int(m.group(1)), int(m.group(2)) + 1 if m.group(2) else total, 206
                    self.send_response(status)
                    for k, v in r.headers.items():
                        if k.lower() not in _HOP_HEADERS:
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(total if self.command == "HEAD" else end - start))
                    if status == 206:
                        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{total}")
                    self.end_headers()
                    if body:
                        self._relay(r.iter_raw(), start, end, seen)

            def _serve_cached(self, cached: tuple[int, dict[str, str], Path], seen: Seen) -> None:
                status, upstream_headers, path = cached
                total = path.stat().st_size
                m = _RANGE.match(seen.range or "")
                start, end = (int(m.group(1)), int(m.group(2)) + 1 if m.group(2) else total) if m and status == 200 else (0, total)
                self.send_response(206 if m and status == 200 else status)
                for k, v in upstream_headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(end - start))
                if m and status == 200:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{total}")
                self.end_headers()
                with path.open("rb") as f:
                    self.wfile.flush()
                    offset = start
                    while offset < end:
                        proxy._take_link(min(end - offset, 1 << 20))
                        sent = os.sendfile(self.connection.fileno(), f.fileno(), offset, min(end - offset, (1 << 20) if proxy.total_rate else 8 << 20))
                        if sent == 0:
                            break
                        offset += sent
                        seen.bytes_sent += sent

            def _relay(self, chunks: Iterator[bytes], start: int, end: int, seen: Seen) -> None:
                """Stream the upstream body, sending only [start, end), at `rate` when throttled."""
                pos = 0
                for chunk in chunks:
                    lo, hi = max(start - pos, 0), min(end - pos, len(chunk))
                    pos += len(chunk)
                    for i in range(lo, hi, 64 << 10):
                        piece = chunk[i : min(i + (64 << 10), hi)]
                        proxy._take_link(len(piece))
                        self.wfile.write(piece)
                        seen.bytes_sent += len(piece)
                        if proxy.rate:
                            time.sleep(len(piece) / proxy.rate)
                    if pos >= end:
                        return

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # a fleet benchmark opens dozens of downloads at once
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # clients killed mid-stream (the point of some tests) break the pipe

        self._server = Server(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _cached(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Path]:
        """The upstream answer for `path`, fetched once however many ask at the same time."""
        key = hashlib.sha256(path.encode()).hexdigest()
        body, meta = self.cache_dir / key, self.cache_dir / f"{key}.json"
        with self._fills_lock:
            lock = self._fills.setdefault(key, threading.Lock())
        with lock:
            if not meta.exists():
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                with httpx2.stream("GET", self.upstream + path, headers=headers, follow_redirects=True, timeout=600) as r, body.open("wb") as f:
                    for chunk in r.iter_raw():
                        f.write(chunk)
                    kept = {k: v for k, v in r.headers.items() if k.lower() not in _HOP_HEADERS}
                meta.write_text(json.dumps([r.status_code, kept]))
        status, kept = json.loads(meta.read_text())
        return status, kept, body

    def _take_link(self, n: int) -> None:
        """With total_rate, wait for this chunk's turn on the shared link (every response together stays under the rate)."""
        if not self.total_rate:
            return
        with self._link_lock:
            now = time.monotonic()
            done = max(now, self._link_free) + n / self.total_rate
            self._link_free = done
        time.sleep(done - now)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class TcpCounter:
    """A loopback TCP relay that counts the bytes each way: put in front of a host's sshd, it measures what the control machine sends."""

    upstream_port: int
    port: int = field(default_factory=free_port)
    sent: int = 0  # client → upstream
    received: int = 0  # upstream → client
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> TcpCounter:
        self._listener = socket.create_server(("127.0.0.1", self.port), backlog=64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, "sent"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, "received"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._listener.close()
