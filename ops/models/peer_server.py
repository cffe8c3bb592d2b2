"""The peer server: a host serves its verified files to the hosts that still need them (ops.models.peer_client takes them).

    python -m ops.models peer-serve --dest DIR --bind ADDR [--port 0] --token-file F --port-file P [--lock models.lock] [--max-rate B/s] [--seconds S]

The lock's sha256s are the only thing trusted, so a host can take bytes from
any peer without trusting it: every file is hashed while it arrives and must
match the lock before it is activated, or served onward. A peer serves only
files of commit directories in its store, and, while it is still fetching
with `fetch --share`, the files whose hash already matched the lock (hard
links under `.staging/<name>/<commit>.ready/`): a file is passed on as soon as
it is verified, not when the whole model is, so the copies down a chain of
hosts overlap. With a lock that has pieces, it goes further (cut-through): a
Range request for pieces of a file still arriving that already matched the
lock (`.staging/<name>/<commit>.pieces/<path>` says which) is served from
the partial file, so a file passes from host to host a piece at a time. For a file of a commit the host's lock (`--lock`, the one its
fetch follows) pins but not activated here yet, it answers 425 (still on its
way) after holding the request a moment in case it lands, and the asking host
asks again; a host whose fetch fails has its
server stopped, which sends its peers elsewhere. Any other commit is 404: a
server with no lock never says "not yet", so nobody waits on a host that is
not fetching. Over HTTP with Range (resumable; Starlette's
FileResponse), bound to the address the inventory gives, to requests carrying
this run's secret, and only until the run's deadline. Links are never followed.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ops.errors import BakehouseError
from ops.models import safefs, values
from ops.models.lock import load_lock, safe_relpath
from ops.models.pieces import piece_count, read_have
from ops.models.stamp import FileStat, read_stamp
from ops.models.store import STAGING, Store

PEER_TOKEN = "BAKEHOUSE_PEER_TOKEN"  # the variable a fetch reads its peers' secret from (on stdin, with --env-stdin)
# A question for a file still on its way is held this long, looking for the file every ARRIVAL_CHECK_SECONDS, and answered as soon
# as it lands: 8 hosts asking 5 times a second for each of their files cost a core a quarter of its time in connections and 425s.
HOLD_SECONDS = 2.0
ARRIVAL_CHECK_SECONDS = 0.05
IDLE_SECONDS = 5  # between requests on one connection
FIRST_REQUEST_SECONDS = 10  # from connecting to a whole request
PER_CLIENT = 16  # connections one address may hold at once (a host fetching with 8 workers needs 8)


Locked = Mapping[tuple[str, str, str], int]  # (model, commit, path) -> size, from this host's lock
Pieces = Mapping[tuple[str, str, str], tuple[int, int]]  # (model, commit, path) -> (size, piece size), for the files the lock has pieces of


def file_path(root: Path, name: str, commit: str, path: str, locked: Locked | None = None) -> Path | None:
    """The store file a peer may serve, or None: a validated name, commit and path, a real file under real directories, and
    either a commit directory's file exactly as its `.verified` stamp recorded it (size, mtime, inode: not a file put there
    since, a planted hard link included), or one this host's `fetch --share` already matched against the lock (its size the lock's).
    """
    rel = _valid(name, commit, path)
    if rel is None:
        return None
    store = Store(root)
    stamped = store.commit_dir(name, commit) / rel
    if _real_file(root, stamped) is not None:
        stamp = read_stamp(store.commit_dir(name, commit))
        entry = stamp.files.get(rel) if stamp else None
        st = _real_file(root, stamped)
        return stamped if entry is not None and st is not None and FileStat.of(st) == entry.stat else None
    ready = store.ready_dir(name, commit) / rel
    st = _real_file(root, ready)
    size = (locked or {}).get((name, commit, rel))
    return ready if st is not None and size is not None and st.st_size == size else None


def growing_file(root: Path, name: str, commit: str, path: str, pieces: Pieces | None = None) -> tuple[int, str] | None:
    """A file this host's `fetch --share` is still receiving, for a lock with pieces: an open descriptor of its partial file and
    which of its pieces matched the lock (`.pieces/<path>`), or None. The caller closes the descriptor."""
    rel = _valid(name, commit, path)
    shape = (pieces or {}).get((name, commit, rel or ""))
    if rel is None or shape is None:
        return None
    store = Store(root)
    record, partial = store.pieces_dir(name, commit) / rel, store.partial_dir(name, commit) / rel
    # The record is read only through real directories (a planted link could point it at a file claiming every piece)
    have = read_have(record, piece_count(*shape)) if _real_file(root, record) is not None else ""
    if "1" not in have or _real_file(root, partial) is None:
        return None
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    return fd, have


def asked_range(header: str) -> tuple[int, int] | None:
    """`bytes=A-B` (one closed range) -> (A, B + 1); anything else None."""
    unit, _, spec = header.partition("=")
    first, _, last = spec.strip().partition("-")
    if unit.strip() != "bytes" or not first.isdigit() or not last.isdigit() or int(last) < int(first):
        return None
    return int(first), int(last) + 1


def _real_file(root: Path, target: Path) -> os.stat_result | None:
    try:
        safefs.check_no_link(root, target)
        st = os.lstat(target)
    except (BakehouseError, OSError):
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def still_coming(root: Path, name: str, commit: str, path: str, coming: Collection[tuple[str, str]]) -> bool:
    """A valid request for a commit this host's fetch will bring (`coming`: name and commit pairs of its lock), not activated
    here yet: it will have the file unless it fails (then its server is stopped, which tells its peers to go elsewhere)."""
    return (name, commit) in coming and _valid(name, commit, path) is not None and not os.path.lexists(Store(root).commit_dir(name, commit))


def _valid(name: str, commit: str, path: str) -> str | None:
    if values.name_problem(name) or not (values.GIT_COMMIT.match(commit) or values.SHA256.match(commit)):
        return None
    try:
        return safe_relpath(path)
    except BakehouseError:
        return None


def peer_app(root: Path, token: str, *, coming: Collection[tuple[str, str]] = (), locked: Locked | None = None, pieces: Pieces | None = None,
             max_rate: int = 0, deadline: float = 0.0) -> Any:
    """The ASGI app: GET or HEAD /<name>/<commit>/<path> with `Authorization: Bearer <token>`; 425 for a file still on its way here."""
    import anyio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    class BigChunks(FileResponse):
        chunk_size = 1 << 20  # Starlette's 64 KiB costs a thread hop per chunk: 1.8 s of a core per GB served, 0.7 s with 1 MiB

    def piece_response(request: Request, p: Mapping[str, str]) -> Response | None:
        """A range of verified pieces of a file still arriving (cut-through, a lock with pieces); None if they are not all here yet."""
        wanted = asked_range(request.headers.get("range", ""))
        growing = growing_file(root, p["name"], p["commit"], p["path"], pieces) if wanted else None
        if growing is None or wanted is None:
            return None
        fd, have = growing
        start, end = wanted
        size, piece_size = (pieces or {})[(p["name"], p["commit"], p["path"])]
        if end > size or "0" in have[start // piece_size : -(-end // piece_size)]:
            os.close(fd)
            return None

        async def body() -> Any:
            try:
                at = start
                while at < end:
                    data = await anyio.to_thread.run_sync(os.pread, fd, min(1 << 20, end - at), at)
                    if not data:
                        return  # cut short: the asking host sees fewer bytes than asked and goes elsewhere
                    yield data
                    at += len(data)
            finally:
                os.close(fd)

        headers = {"content-range": f"bytes {start}-{end - 1}/{size}", "content-length": str(end - start), "cache-control": "no-store"}
        if request.method == "HEAD":
            os.close(fd)
            return Response(status_code=206, headers=headers)
        return StreamingResponse(body(), status_code=206, headers=headers)

    async def serve_file(request: Request) -> Response:
        if deadline and time.time() > deadline:
            return PlainTextResponse("this peer's run is over", status_code=410)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            return PlainTextResponse("unauthorized", status_code=401)
        p = request.path_params
        target = file_path(root, p["name"], p["commit"], p["path"], locked)
        held = time.monotonic() + HOLD_SECONDS
        while target is None and still_coming(root, p["name"], p["commit"], p["path"], coming):
            if (piece := piece_response(request, p)) is not None:
                return piece
            if time.monotonic() >= held:
                break
            await anyio.sleep(ARRIVAL_CHECK_SECONDS)
            target = file_path(root, p["name"], p["commit"], p["path"], locked)
        if target is None and still_coming(root, p["name"], p["commit"], p["path"], coming):
            return PlainTextResponse("not yet: this host is still fetching it", status_code=425)
        if target is None:
            return PlainTextResponse("not here", status_code=404)
        return BigChunks(target, headers={"cache-control": "no-store"})

    app = Starlette(routes=[Route("/{name}/{commit}/{path:path}", serve_file, methods=["GET", "HEAD"])])
    app.router.redirect_slashes = False  # anything but a file path is a plain 404
    return paced(app, max_rate) if max_rate else app


def paced(app: Any, max_rate: int) -> Any:
    """ASGI middleware: each response's body leaves at most `max_rate` bytes a second (a peer should not starve its own host)."""
    import anyio

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        start, sent = time.monotonic(), 0

        async def paced_send(message: dict) -> None:
            nonlocal sent
            if message.get("type") == "http.response.body":
                sent += len(message.get("body", b""))
                ahead = sent / max_rate - (time.monotonic() - start)
                if ahead > 0:
                    await anyio.sleep(ahead)
            await send(message)

        await app(scope, receive, paced_send)

    return wrapped


def guarded_protocol() -> type:
    """uvicorn's HTTP protocol with two guards against clients that hold connections: a connection must have sent a whole
    request within FIRST_REQUEST_SECONDS (a slow or silent one is closed), and one client address holds at most
    PER_CLIENT connections (its next ones are closed at once). Between requests, uvicorn's keep-alive timeout applies."""
    import asyncio
    from collections import Counter

    from uvicorn.protocols.http.h11_impl import H11Protocol

    per_client: Counter[str] = Counter()

    class Guarded(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._who = self.client[0] if self.client else "?"
            per_client[self._who] += 1
            if per_client[self._who] > PER_CLIENT:
                transport.close()
                return
            self._first = self.loop.call_later(FIRST_REQUEST_SECONDS, self._slow)

        def _slow(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            per_client[self._who] -= 1
            if getattr(self, "_first", None) is not None:
                self._first.cancel()
            super().connection_lost(exc)

    return Guarded


def serve(root: Path, bind: str, port: int, token_file: Path, port_file: Path, *, lock: Path | None = None, max_rate: int = 0, seconds: float = 3600) -> int:
    """Run until the deadline: read (and remove) the token file, write the port we bound to, serve."""
    models = load_lock(lock).models.values() if lock else ()
    coming = frozenset((m.name, m.commit) for m in models)
    locked = {(m.name, m.commit, f.path): f.size for m in models for f in m.files}
    pieces = {(m.name, m.commit, f.path): (f.size, f.piece_size) for m in models for f in m.files if f.pieces}
    import uvicorn

    try:
        token = token_file.read_text().strip()
        token_file.unlink()
    except OSError as exc:
        raise BakehouseError(f"{token_file}: cannot read the peer secret ({exc.strerror}). Re-run the fan-out from the control machine.") from exc
    if len(token) < 16:
        raise BakehouseError(f"{token_file}: the peer secret is too short. Re-run the fan-out from the control machine.")
    sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, port))
    except OSError as exc:
        raise BakehouseError(f"cannot listen on {bind}:{port} ({exc.strerror}). Is {bind} this host's address (ansible_host)?") from exc
    sock.listen(128)  # before the port is published: a peer that connects at once waits in the backlog instead of being refused
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(str(sock.getsockname()[1]))
    os.replace(tmp, port_file)
    # Idle, slow and too many connections from one address are closed (guarded_protocol): clients that only hold connections
    # open cannot starve the peers that fetch.
    config = uvicorn.Config(peer_app(root, token, coming=coming, locked=locked, pieces=pieces, max_rate=max_rate, deadline=time.time() + seconds), log_level="warning",
                            timeout_graceful_shutdown=1, timeout_keep_alive=IDLE_SECONDS, http=guarded_protocol())
    server = uvicorn.Server(config)
    # At the run's deadline the socket closes: a server orphaned by a lost controller does not listen for ever.
    closer = threading.Timer(seconds, lambda: setattr(server, "should_exit", True))
    closer.daemon = True
    closer.start()
    # uvicorn re-raises the signal it stopped for once it has shut down: make SIGTERM an exit that runs the cleanup below.
    signal.signal(signal.SIGTERM, _exit)
    try:
        server.run(sockets=[sock])
    finally:
        _drop_ready(root)
    return 0


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _drop_ready(root: Path) -> None:
    """The links fetch --share left for commits now activated here (their commit directories hold the same files).

    A commit not activated keeps its links: a fetch still running (another run's, with a server of its own) is offering
    them; a fetch that failed removed its own, and one that was killed has them removed by the next fetch of the model.
    """
    store = Store(root)
    for ready in [*(root / STAGING).glob("*/*.ready"), *(root / STAGING).glob("*/*.pieces")]:
        name, commit = ready.parent.name, ready.name.rpartition(".")[0]
        with contextlib.suppress(BakehouseError, OSError):
            if stat.S_ISDIR(os.lstat(store.commit_dir(name, commit)).st_mode):
                safefs.remove(root, ready)
