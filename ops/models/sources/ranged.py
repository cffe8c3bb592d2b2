"""Large files at the wire's rate: concurrent ranged GETs, each chunk written at its offset, the sha256 computed in order.

One stream over HTTP tops out far below a fast link or a local origin (Python
receiving one nginx stream with sha256 inline: about 0.4 GB/s here), so a file
of BAKEHOUSE_RANGED_MIN_BYTES (64 MiB) or more is fetched in chunks of
BAKEHOUSE_RANGE_CHUNK_BYTES (8 MiB; a 64th of a smaller file, 1 MiB at least), with BAKEHOUSE_RANGES (8) range requests
in flight for the whole fetch, whatever the number of files, as hf_transfer
and hf_xet (HF_XET_NUM_CONCURRENT_RANGE_GETS) do. Each chunk is written at its
offset in the partial file as it arrives, and handed to the hash, which
consumes chunks in file order: the file is hashed while it is written, never
read back. Workers stay at most WINDOW chunks ahead of the hash.

Memory and the page cache: chunks land in a fixed set of buffers for the whole
fetch (2 x BAKEHOUSE_RANGES, so 128 MiB at the defaults, however many files),
made once and reused; and they are written with O_DIRECT where the filesystem
allows it, from those buffers straight to the disk. Writing through the page
cache instead costs a copy into newly allocated pages for every byte, and on a
virtual machine first touching a page is expensive: 1 GB written that way took
0.2 to 2.8 s of CPU here (the same bytes with O_DIRECT: 0.08 s), more than
receiving and hashing them. The fetched files are then not in the page cache;
BAKEHOUSE_DIRECT_IO=0 writes through it (and starts each range's writeback at
once, so the final fsync finds little left to do).

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
import errno
import functools
import hashlib
import http.client
import mmap
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
from ops.settings import env_flag, env_number

WINDOW = 8  # chunks the workers of one file may run ahead of its hash: memory is bounded by WINDOW x the chunk size
PIECES = 8  # a chunk's progress is written to disk and recorded every eighth of it (1 MiB of an 8 MiB chunk)
TIMEOUT = 60.0
ATTEMPTS = 3  # per chunk: a connection that drops mid-chunk is tried again
ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in whole blocks (4096 covers 512-byte devices too)


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
    """Rounded down to whole blocks, so every chunk starts where a direct write may."""
    size = int(env_number("BAKEHOUSE_RANGE_CHUNK_BYTES", 8 << 20, minimum=64 << 10, maximum=1 << 30))
    return size - size % ALIGN


def file_chunk(size: int, largest: int) -> int:
    """A file's chunk: `largest`, or a 64th of a smaller file (1 MiB at least, in whole blocks). What a crash loses is what was
    in flight, up to a chunk a request (the origin has sent it into the socket buffers), and a file in many chunks keeps
    every request busy to its end: 8 MiB chunks lost 6 % of a 1 GB model of 256 MB shards to a kill -9, 4 MiB ones 2 %."""
    part = size // 64
    return min(largest, max(1 << 20, part - part % ALIGN))


def applies(url: str, size: int) -> bool:
    """Ranged for large files over plain http(s), not through a proxy (the sequential download, through the hub client, honours proxies)."""
    parts = urllib.parse.urlsplit(url)
    proxied = parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or "")
    large = size >= int(env_number("BAKEHOUSE_RANGED_MIN_BYTES", 64 << 20, minimum=0))
    return large and ranges_wanted() > 1 and parts.scheme in ("http", "https") and not proxied


class Buffers:
    """Page-aligned chunk buffers, made when first needed (at most `count`) and then reused: a buffer's pages are
    touched once for the whole fetch, not once per chunk."""

    def __init__(self, size: int, count: int) -> None:
        self.size, self.count, self.made = size, count, 0
        self.free: list[memoryview] = []
        self.cond = threading.Condition()

    def take(self, stop: Callable[[], bool]) -> memoryview | None:
        """A buffer, waiting while all are in use; None once `stop()` says the fetch is over."""
        with self.cond:
            while not self.free and self.made >= self.count:
                if stop():
                    return None
                self.cond.wait(0.5)
            if self.free:
                return self.free.pop()
            self.made += 1
        return memoryview(mmap.mmap(-1, self.size))

    def give(self, buffer: memoryview) -> None:
        with self.cond:
            self.free.append(buffer)
            self.cond.notify()


@dataclass
class Budget:
    """What one fetch's ranged downloads share, whatever the number of files: requests in flight, chunk buffers, and how
    they are written (BAKEHOUSE_DIRECT_IO), read once when the fetch starts, so a bad value stops it before any download."""

    slots: threading.BoundedSemaphore
    buffers: Buffers
    direct: bool = True

    @classmethod
    def for_fetch(cls) -> Budget:
        n = ranges_wanted()
        return cls(threading.BoundedSemaphore(n), Buffers(chunk_bytes(), 2 * n), env_flag("BAKEHOUSE_DIRECT_IO", True))


class Disk:
    """Writes a file's chunks: with O_DIRECT (whole blocks, from the aligned buffers) where the filesystem takes it, the
    last partial block of the file through the page cache; through the page cache only, with early writeback, otherwise."""

    def __init__(self, fd: int, direct: bool) -> None:
        self.fd = fd
        self.direct_fd = _reopen_direct(fd) if direct else -1
        self.direct = self.direct_fd >= 0

    def write(self, buffer: memoryview, at: int, lo: int, hi: int, last: bool) -> int:
        """Bytes [lo, hi) of a chunk that starts at file offset `at`; returns how much of the chunk is now on disk (`hi`,
        or less when a direct write must wait for a whole block, which a later call or the chunk's last one writes)."""
        if self.direct:
            end = hi - hi % ALIGN
            try:
                if end > lo:
                    _write_all(self.direct_fd, buffer[lo:end], at + lo)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Refused after all: the page cache from here on. The descriptor stays open until close(): other workers may be
                # writing through it this moment, and a descriptor closed under them could be reused for another file.
                self.direct = False
            else:
                if not last:
                    return max(lo, end)
                lo = max(lo, end)
        if hi > lo:
            _write_all(self.fd, buffer[lo:hi], at + lo)
            if not self.direct:
                start_writeback(self.fd, at + lo, hi - lo)
        return hi

    def close(self) -> None:
        """After every worker has stopped."""
        self.direct = False
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """Every byte, or an error: the hash is taken from the buffer, so a short write taken for a whole one would activate a
    file whose bytes on disk are not the bytes that were checked."""
    while data:
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no byte written (is the disk full?)")
        data, offset = data[n:], offset + n


def _reopen_direct(fd: int) -> int:
    """A second open file description for the same file, with O_DIRECT (through /proc/self/fd: the same inode, no path
    looked up again); -1 where there is no O_DIRECT or the filesystem refuses it (tmpfs before Linux 6.6, some FUSE)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError:
        return -1


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


class Connection:
    """One worker's HTTP connection, kept open from one chunk to the next (as curl and hf_transfer do): a new TCP and TLS
    handshake for every chunk costs round trips that a long link feels. Any chunk that does not end cleanly drops it."""

    def __init__(self) -> None:
        self.conn: http.client.HTTPConnection | None = None
        self.origin = ("", "")

    def request(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """GET `url`, on the kept connection when it goes to the same place; a kept connection the server has closed
        meanwhile is replaced once, silently (its idle timeout is not a failure)."""
        parts = urllib.parse.urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        reused = self.conn is not None and self.origin == (parts.scheme, parts.netloc)
        if not reused:
            self.drop()
            self.conn, self.origin = _connect(parts), (parts.scheme, parts.netloc)
        assert self.conn is not None
        try:
            return _ask(self.conn, path, headers)
        except (http.client.RemoteDisconnected, ConnectionError):
            if not reused:
                raise
            self.drop()
            self.conn = _connect(parts)
            return _ask(self.conn, path, headers)

    def done(self, answer: http.client.HTTPResponse) -> None:
        """The answer was read to its end: keep the connection unless the server said it closes it."""
        if answer.will_close:
            self.drop()

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _connect(parts: urllib.parse.SplitResult) -> http.client.HTTPConnection:
    if parts.scheme == "https":
        cafile = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or None
        return http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=TIMEOUT, context=ssl.create_default_context(cafile=cafile))
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT)


def fetch_chunk(target: Target, start: int, length: int, buffer: memoryview, cancelled: Callable[[], bool], source: str,
                on_data: Callable[[int], None] = lambda got: None, connection: Connection | None = None) -> None:
    """Bytes [start, start + length) into `buffer`: a 206 for exactly that range, exactly that many bytes; redirects followed.
    `on_data` hears how many bytes have arrived so far. `connection`: kept open for the next chunk when this one ends cleanly."""
    asked = f"{start}-{start + length - 1}"
    connection = connection or Connection()
    for _ in range(6):
        clean = False
        try:
            with _network(source):
                answer = connection.request(target.url, target.headers | {"range": f"bytes={asked}"})
            if answer.status in (301, 302, 303, 307, 308) and answer.getheader("location"):
                target.follow(answer.getheader("location") or "")
                connection.done(answer)
                clean = True
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
            clean = answer.length == 0  # a body longer than the range, or of no stated length: what follows cannot be trusted
            if clean:
                connection.done(answer)
            return
        finally:
            if not clean:
                connection.drop()
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
    disk: Disk
    ledger: Ledger
    on_bytes: Callable[[int], None]
    written: int = 0

    def resume(self) -> None:
        """Bytes a crash left on disk, down to a whole block: read back into the buffer; the request asks for the rest."""
        have = self.ledger.started.get(self.k, 0)
        have -= have % ALIGN
        if have:
            self.buffer[:have] = os.pread(self.disk.fd, have, self.start)
            self.on_bytes(have)
        self.written = have

    def arrived(self, base: int) -> Callable[[int], None]:
        """What a request from byte `base` of the chunk reports as its bytes arrive."""
        return lambda got: self.filled(base + got)

    def filled(self, upto: int) -> None:
        """The buffer holds the chunk's first `upto` bytes: write and record them every eighth of the chunk, and at the end."""
        if upto - self.written >= self.length // PIECES or upto == self.length:
            now = self.disk.write(self.buffer, self.start, self.written, upto, upto == self.length)
            if now > self.written:
                self.on_bytes(now - self.written)
                self.written = now
                self.ledger.add(self.k, None if now == self.length else now)


class Hasher:
    """Consumes chunks in file order, as they come (or from disk, for chunks a crash left there); workers wait when too far ahead."""

    def __init__(self, fd: int, chunks: int, chunk: int, size: int, on_bytes: Callable[[int], None], check: PieceCheck | None = None) -> None:
        self.fd, self.chunks, self.chunk, self.size, self.on_bytes, self.check = fd, chunks, chunk, size, on_bytes, check
        self.digest = hashlib.sha256()
        self.next = 0
        self.arrived: dict[int, tuple[memoryview | None, Callable[[], None]]] = {}  # None: on disk already; then: give the buffer back
        self.cond = threading.Condition()
        self.failed: BaseException | None = None

    def may_take(self, k: int) -> bool:
        return k < self.next + WINDOW

    def put(self, k: int, data: memoryview | None, release: Callable[[], None] = lambda: None) -> None:
        with self.cond:
            self.arrived[k] = (data, release)
            self.cond.notify_all()

    def release_all(self) -> None:
        """The buffers of chunks that arrived but will not be hashed (the fetch stopped): back to the pool."""
        with self.cond:
            left, self.arrived = list(self.arrived.values()), {}
        for _, release in left:
            release()

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
                data, release = self.arrived.pop(self.next)
            start = self.next * self.chunk
            length = min(self.chunk, self.size - start)
            try:
                if data is None:  # written before a crash: read back once
                    data = memoryview(os.pread(self.fd, length, start))
                    self.on_bytes(len(data))
                self.digest.update(data)
                if self.check is not None:  # each piece checked as the hash reaches its end, and offered to peers (fetch --share)
                    self.check.update(data)
            finally:
                release()
            with self.cond:
                self.next += 1
                self.cond.notify_all()
        return self.digest.hexdigest()


def ranged_download(url: str, headers: dict[str, str], file: LockedFile, job: FetchJob, *, source: str) -> str:
    """The file into staging by ranged GETs (see the module's docstring); RangesNotSupported before any byte is kept when the server ignores Range."""
    assert job.ranges is not None
    partial = job.partial / file.path
    budget = job.budget or Budget.for_fetch()
    chunk = file_chunk(file.size, budget.buffers.size)
    chunks = -(-file.size // chunk)
    ledger = Ledger(job.ranges / file.path, job.root, chunks, chunk)
    ledger.load()
    fd = safefs.open_file(job.root, partial, os.O_RDWR | os.O_CREAT)
    disk = Disk(fd, budget.direct)
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
        queue_lock = threading.Lock()
        cancelled = job.cancel.is_set

        def over() -> bool:
            return hasher.failed is not None or cancelled()

        def take() -> tuple[int, memoryview] | None:
            """The next chunk, with a buffer taken first: a chunk taken always has somewhere to go, so the hash never waits
            for a chunk that waits for a buffer."""
            buffer = budget.buffers.take(over)
            if buffer is None:
                return None
            with queue_lock:
                k = todo.pop(0) if todo else None
            with hasher.cond:
                while k is not None and not hasher.may_take(k) and not over():
                    hasher.cond.wait(0.5)
            if k is None or over():
                budget.buffers.give(buffer)
                return None
            return k, buffer

        def fetch(k: int, buffer: memoryview, connection: Connection) -> None:
            c = Chunk(k, k * chunk, min(chunk, file.size - k * chunk), buffer, disk, ledger, job.progress.update)
            c.resume()
            for attempt in range(ATTEMPTS):
                base = c.written
                try:
                    with budget.slots:
                        fetch_chunk(target, c.start + base, c.length - base, buffer[base : c.length], cancelled, source, c.arrived(base),
                                    connection)
                    break
                except SourceUnreachableError:  # tried again from what is written
                    if attempt == ATTEMPTS - 1:
                        raise
            c.filled(c.length)

        def worker() -> None:
            connection = Connection()
            try:
                while (taken := take()) is not None:
                    k, buffer = taken
                    try:
                        fetch(k, buffer, connection)
                    except BaseException as exc:
                        budget.buffers.give(buffer)
                        hasher.fail(exc)
                        return
                    hasher.put(k, buffer[: min(chunk, file.size - k * chunk)], functools.partial(budget.buffers.give, buffer))
            finally:
                connection.drop()

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
                hasher.release_all()
        except RangesNotSupported:
            ledger.clear()
            os.ftruncate(fd, 0)
            raise
        except BadPieceError as exc:
            sha = f"(piece {exc.index} differs)"
        disk.close()
        if sha != file.sha256:
            ledger.clear()
            os.close(fd)
            fd = -1
            partial.unlink()
            raise VerificationError(f"{file.path}: downloaded sha256 {sha}, models.lock pins {file.sha256}. The source now serves other bytes "
                                    "at this commit: nothing was activated. If the change is intended, re-run `invoke lock-models` and review the diff.")
        into_staging(job, file, fd)
    finally:
        disk.close()
        if fd >= 0:
            os.close(fd)
    ledger.clear()
    return sha
