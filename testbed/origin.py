"""An origin on loopback for one file that honours Range, or misbehaves in a named way; it counts what it sends."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


@dataclass
class Origin:
    """An origin on loopback for one file, `mode` saying how it misbehaves; it counts the bytes it sends and the ranges asked."""

    body: bytes
    mode: str = "ok"
    rate: float = 0.0  # bytes a second per response (0: unthrottled)
    sent: int = 0
    connections: int = 0
    ranges: list[str] = field(default_factory=list)
    dropped: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def start(self) -> Origin:
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with origin.lock:
                    origin.connections += 1

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(origin.body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self) -> None:
                m = _RANGE.fullmatch(self.headers.get("range", ""))
                with origin.lock:
                    origin.ranges.append(self.headers.get("range", ""))
                if not m or origin.mode == "ignore-range":
                    return self._send(200, origin.body, None)
                a, b = int(m.group(1)), int(m.group(2))
                if origin.mode == "wrong-range":
                    a, b = a + 1, b + 1
                part = origin.body[a : b + 1]
                if origin.mode == "extra-bytes":
                    return self._send(206, part + b"X" * 4096, f"bytes {a}-{b}/{len(origin.body)}", length=len(part) + 4096)
                if origin.mode == "close-early-once" and a % (1 << 20) == 0 and a not in origin.dropped:  # the first try of each chunk
                    origin.dropped.add(a)
                    return self._send(206, part[: len(part) // 2], f"bytes {a}-{b}/{len(origin.body)}", length=len(part))
                if origin.mode == "other-bytes" and a == 0:
                    part = b"\0" * len(part)
                return self._send(206, part, f"bytes {a}-{b}/{len(origin.body)}")

            def _send(self, status: int, data: bytes, content_range: str | None, length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                if content_range:
                    self.send_header("Content-Range", content_range)
                self.end_headers()
                for at in range(0, len(data), 1 << 16):
                    piece = data[at : at + (1 << 16)]
                    try:
                        self.wfile.write(piece)
                    except OSError:
                        return
                    with origin.lock:
                        origin.sent += len(piece)
                    if origin.rate:
                        time.sleep(len(piece) / origin.rate)
                if (length is not None and length > len(data)) or origin.mode == "drop-idle":  # drop-idle: closed without a word, as an idle timeout does
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/weights.safetensors"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
