"""Large files at the wire's rate: concurrent ranged GETs, each chunk written at its offset, the sha256 computed in order.

One stream over HTTP tops out far below a fast link or a local origin (Python
receiving one nginx stream with sha256 inline: about 0.4 GB/s here), so a file
of BAKEHOUSE_RANGED_MIN_BYTES (64 MiB) or more is fetched in chunks of
BAKEHOUSE_RANGE_CHUNK_BYTES (8 MiB), with BAKEHOUSE_RANGES (8) range requests
in flight for the whole fetch, whatever the number of files, as hf_transfer
and hf_xet (HF_XET_NUM_CONCURRENT_RANGE_GETS) do. Each chunk is written at its
offset in the partial file as it arrives, and handed to the hash, which
consumes chunks in file order: the file is hashed while it is written, never
read back. Workers stay at most WINDOW chunks ahead of the hash, so memory is
bounded.

Resume: what is written is recorded in a log beside the partial file
(`<commit>.ranges/<path>`: each chunk complete, and each chunk's progress every
eighth of it); after a crash or kill -9, the next fetch re-hashes what is there
(from the page cache, in order) and asks only for the rest, so a crash costs at
most an eighth of a chunk per request in flight. Nothing here trusts the server: a chunk must come back as a 206 for
exactly the range asked and its exact length; the whole file must match the
lock's sha256 before it enters staging (receive_file's checks, the same as
every other download). A server that does not honour Range gets the
sequential download instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import os
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ops.errors import BadPieceError, Cancelled, RangesNotSupported, SourceError, SourceUnreachableError, VerificationError
from ops.models import safefs
from ops.models.lock import LockedFile
from ops.models.pieces import PieceCheck
from ops.models.sources.base import FetchJob
from ops.models.sources.transfer import into_staging, piece_check, status_error
from ops.settings import env_number

WINDOW = 8  # chunks the workers of one file may run ahead of its hash: memory is bounded by WINDOW x the chunk size
PIECES = 8  # a chunk's progress is written to disk and recorded every eighth of it (1 MiB of an 8 MiB chunk)
TIMEOUT = 60.0
ATTEMPTS = 3  # per chunk: a connection that drops mid-chunk is tried again


def _writeback() -> Callable[[int, int, int], None]:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk now, without waiting. The final fsync then
    finds the file mostly written, instead of flushing all of it after the last byte arrived. Elsewhere: nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
        call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    return lambda fd, offset, length: call(fd, offset, length, 2)


start_writeback = _writeback()


def ranges_wanted() -> int:
    return int(env_number("BAKEHOUSE_RANGES", 8, minimum=1, maximum=128))


def chunk_bytes() -> int:
    return int(env_number("BAKEHOUSE_RANGE_CHUNK_BYTES", 8 << 20, minimum=64 << 10, maximum=1 << 30))


def applies(url: str, size: int) -> bool:
    """Ranged for large files over plain http(s), not through a proxy (the sequential download, through the hub client, honours proxies)."""
    parts = urllib.parse.urlsplit(url)
    proxied = parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or "")
    large = size >= int(env_number("BAKEHOUSE_RANGED_MIN_BYTES", 64 << 20, minimum=0))
    return large and ranges_wanted() > 1 and parts.scheme in ("http", "https") and not proxied


@dataclass
class Ledger:
    """Which chunks of one file are on disk: read at start (a crash left some), appended to as chunks are written."""

    path: Path
    root: Path
    chunks: int
    chunk: int
    done: set[int] = field(default_factory=set)
    started: dict[int, int] = field(default_factory=dict)  # chunk -> bytes of it on disk, for chunks not done

    def load(self) -> None:
        """What was recorded with this chunk size (the first line); another size, or a log that is not ours, counts for nothing."""
        try:
            lines = self.path.read_text().split()
        except OSError:
            return
        if lines[:1] != [f"chunk={self.chunk}"]:
            return
        for line in lines[1:]:
            index, _, n = line.partition("@")
            if not index.isdigit() or int(index) >= self.chunks:
                continue
            if not n:
                self.done.add(int(index))
            elif n.isdigit() and int(n) < self.chunk:
                self.started[int(index)] = max(self.started.get(int(index), 0), int(n))
        for k in self.done:
            self.started.pop(k, None)

    def start(self) -> None:
        if not self.done and not self.started:
            fd = safefs.open_file(self.root, self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.write(fd, f"chunk={self.chunk}\n".encode())
            finally:
                os.close(fd)

    def add(self, k: int, upto: int | None = None) -> None:
        """Chunk `k` is on disk (`upto`: its first `upto` bytes)."""
        fd = safefs.open_file(self.root, self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, (f"{k}\n" if upto is None else f"{k}@{upto}\n").encode())
        finally:
            os.close(fd)

    def clear(self) -> None:
        safefs.remove(self.root, self.path)


@dataclass
class Target:
    """Where chunks come from: the URL after redirects (a hub sends LFS files to a CDN), and the headers it may see."""

    url: str
    headers: dict[str, str]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def follow(self, location: str) -> None:
        """A redirect: credentials go only to the host they were meant for."""
        with self.lock:
            new = urllib.parse.urljoin(self.url, location)
            if urllib.parse.urlsplit(new).netloc != urllib.parse.urlsplit(self.url).netloc:
                self.headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
            self.url = new


def _connect(url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        cafile = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or None
        return http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=TIMEOUT, context=ssl.create_default_context(cafile=cafile)), path
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT), path


def fetch_chunk(target: Target, start: int, length: int, buffer: memoryview, cancelled: Callable[[], bool], source: str,
                on_data: Callable[[int], None] = lambda got: None) -> None:
    """Bytes [start, start + length) into `buffer`: a 206 for exactly that range, exactly that many bytes; redirects followed.
    `on_data` hears how many bytes have arrived so far."""
    asked = f"{start}-{start + length - 1}"
    for _ in range(6):
        conn, path = _connect(target.url)
        try:
            with _network(source):
                answer = _ask(conn, path, target.headers | {"range": f"bytes={asked}"})
            if answer.status in (301, 302, 303, 307, 308) and answer.getheader("location"):
                target.follow(answer.getheader("location") or "")
                continue
            if answer.status == 200:
                raise RangesNotSupported()
            if answer.status != 206:
                raise status_error(source, answer.status, answer.read(200).decode(errors="replace"))
            served = (answer.getheader("content-range") or "").removeprefix("bytes ").split("/")[0]
            if served != asked:
                raise SourceUnreachableError(f"{source}: answered bytes {served or '(no Content-Range)'} when asked for {asked}. "
                                             "Check the server or the proxy in between; re-run: completed chunks are kept.")
            got = 0
            while got < length:  # never more than asked: a server sending more cannot fill the disk
                if cancelled():
                    raise Cancelled()
                with _network(source):
                    n = answer.readinto(buffer[got:length])
                if not n:
                    raise SourceUnreachableError(f"{source}: the connection ended after {got} of {length} bytes of a chunk")
                got += n
                on_data(got)
            return
        finally:
            conn.close()
    raise SourceUnreachableError(f"{source}: too many redirects")


def _ask(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    conn.request("GET", path, headers=headers)
    answer = conn.getresponse()
    if answer.status in (301, 302, 303, 307, 308):
        answer.read()
    return answer


@contextlib.contextmanager
def _network(source: str) -> Iterator[None]:
    """What the network does wrong becomes SourceUnreachableError (the chunk is tried again)."""
    try:
        yield
    except (OSError, http.client.HTTPException) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceUnreachableError(f"{source}: cannot download ({type(exc).__name__}: {exc}). Check that the server is up and reachable; "
                                     "re-run: completed chunks are kept.") from exc


@dataclass
class Chunk:
    """One chunk on its way to disk: what is written of it (`written`), and the bytes, kept for the hash."""

    k: int
    start: int
    length: int
    buffer: memoryview
    fd: int
    ledger: Ledger
    on_bytes: Callable[[int], None]
    written: int = 0

    def resume(self) -> None:
        """Bytes a crash left on disk: read back into the buffer; the request asks for the rest."""
        have = self.ledger.started.get(self.k, 0)
        if have:
            self.buffer[:have] = os.pread(self.fd, have, self.start)
            self.on_bytes(have)
        self.written = have

    def arrived(self, base: int) -> Callable[[int], None]:
        """What a request from byte `base` of the chunk reports as its bytes arrive."""
        return lambda got: self.filled(base + got)

    def filled(self, upto: int) -> None:
        """The buffer holds the chunk's first `upto` bytes: write and record them every eighth of the chunk, and at the end."""
        if upto - self.written >= len(self.buffer) // PIECES or upto == self.length:
            os.pwrite(self.fd, self.buffer[self.written : upto], self.start + self.written)
            start_writeback(self.fd, self.start + self.written, upto - self.written)
            self.on_bytes(upto - self.written)
            self.written = upto
            self.ledger.add(self.k, None if upto == self.length else upto)


class Hasher:
    """Consumes chunks in file order, as they come (or from disk, for chunks a crash left there); workers wait when too far ahead."""

    def __init__(self, fd: int, chunks: int, chunk: int, size: int, on_bytes: Callable[[int], None], check: PieceCheck | None = None) -> None:
        self.fd, self.chunks, self.chunk, self.size, self.on_bytes, self.check = fd, chunks, chunk, size, on_bytes, check
        self.digest = hashlib.sha256()
        self.next = 0
        self.arrived: dict[int, bytes | None] = {}  # None: on disk already
        self.cond = threading.Condition()
        self.failed: BaseException | None = None

    def may_take(self, k: int) -> bool:
        return k < self.next + WINDOW

    def put(self, k: int, data: bytes | None) -> None:
        with self.cond:
            self.arrived[k] = data
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            self.failed = self.failed or exc
            self.cond.notify_all()

    def run(self, cancelled: Callable[[], bool]) -> str:
        while self.next < self.chunks:
            with self.cond:
                while self.next not in self.arrived and self.failed is None:
                    if cancelled():
                        raise Cancelled()
                    self.cond.wait(0.5)
                if self.failed is not None:
                    raise self.failed
                data = self.arrived.pop(self.next)
            start = self.next * self.chunk
            length = min(self.chunk, self.size - start)
            if data is None:  # written before a crash: read back once, from the page cache
                data = os.pread(self.fd, length, start)
                self.on_bytes(len(data))
            self.digest.update(data)
            if self.check is not None:  # each piece checked as the hash reaches its end, and offered to peers (fetch --share)
                self.check.update(data)
            with self.cond:
                self.next += 1
                self.cond.notify_all()
        return self.digest.hexdigest()


def ranged_download(url: str, headers: dict[str, str], file: LockedFile, job: FetchJob, *, source: str) -> str:
    """The file into staging by ranged GETs (see the module's docstring); RangesNotSupported before any byte is kept when the server ignores Range."""
    assert job.ranges is not None
    partial = job.partial / file.path
    chunk = chunk_bytes()
    chunks = -(-file.size // chunk)
    ledger = Ledger(job.ranges / file.path, job.root, chunks, chunk)
    ledger.load()
    fd = safefs.open_file(job.root, partial, os.O_RDWR | os.O_CREAT)
    try:
        if not ledger.done and not ledger.started:
            os.ftruncate(fd, 0)  # a partial left by the sequential download (a prefix) is not chunks this ledger knows
        ledger.start()
        os.ftruncate(fd, file.size)
        hasher = Hasher(fd, chunks, chunk, file.size, job.progress.update, piece_check(file, job))
        for k in ledger.done:
            hasher.put(k, None)
        todo = [k for k in range(chunks) if k not in ledger.done]
        target = Target(url, dict(headers))
        slots = job.range_slots or threading.BoundedSemaphore(ranges_wanted())  # requests in flight for the whole fetch
        queue_lock = threading.Lock()
        cancelled = job.cancel.is_set

        def worker() -> None:
            buffer = memoryview(bytearray(chunk))
            try:
                while True:
                    with queue_lock:
                        if not todo:
                            return
                        k = todo.pop(0)
                    with hasher.cond:
                        while not hasher.may_take(k) and hasher.failed is None and not cancelled():
                            hasher.cond.wait(0.5)
                    if hasher.failed is not None or cancelled():
                        return
                    c = Chunk(k, k * chunk, min(chunk, file.size - k * chunk), buffer, fd, ledger, job.progress.update)
                    c.resume()
                    for attempt in range(ATTEMPTS):
                        base = c.written
                        try:
                            with slots:
                                fetch_chunk(target, c.start + base, c.length - base, buffer[base : c.length], cancelled, source, c.arrived(base))
                            break
                        except SourceUnreachableError:  # tried again from what is written
                            if attempt == ATTEMPTS - 1:
                                raise
                    c.filled(c.length)
                    hasher.put(k, bytes(buffer[: c.length]))
            except BaseException as exc:
                hasher.fail(exc)

        threads = [threading.Thread(target=worker, name=f"range-{i}", daemon=True) for i in range(min(ranges_wanted(), max(1, len(todo))))]
        for t in threads:
            t.start()
        try:
            try:
                sha = hasher.run(cancelled)
            finally:  # whatever ended the hash, no worker writes after this
                hasher.fail(Cancelled())
                for t in threads:
                    t.join()
        except RangesNotSupported:
            ledger.clear()
            os.ftruncate(fd, 0)
            raise
        except BadPieceError as exc:
            sha = f"(piece {exc.index} differs)"
        if sha != file.sha256:
            ledger.clear()
            os.close(fd)
            fd = -1
            partial.unlink()
            raise VerificationError(f"{file.path}: downloaded sha256 {sha}, models.lock pins {file.sha256}. The source now serves other bytes "
                                    "at this commit: nothing was activated. If the change is intended, re-run `invoke lock-models` and review the diff.")
        into_staging(job, file, fd)
    finally:
        if fd >= 0:
            os.close(fd)
    ledger.clear()
    return sha
