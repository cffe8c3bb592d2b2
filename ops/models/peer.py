"""Peers: a host serves its verified files to the hosts that still need them, and takes files from its peers.

    python -m ops.models peer-serve --dest DIR --bind ADDR [--port 0] --token-file F --port-file P [--lock models.lock] [--max-rate B/s] [--seconds S]

The lock's sha256s are the only thing trusted, so a host can take bytes from
any peer without trusting it: every file is hashed while it arrives and must
match the lock before it is activated, or served onward. A peer serves only
files of commit directories in its store, and, while it is still fetching
with `fetch --share`, the files whose hash already matched the lock (hard
links under `.staging/<name>/<commit>.ready/`): a file is passed on as soon as
it is verified, not when the whole model is, so the copies down a chain of
hosts overlap. For a file of a commit the host's lock (`--lock`, the one its
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
import http.client
import os
import signal
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ops.errors import BakehouseError, Cancelled, SourceError, SourceUnreachableError, VerificationError
from ops.models import safefs, values
from ops.models.lock import LockedFile, LockedModel, load_lock, safe_relpath
from ops.models.sources.base import FetchJob
from ops.models.sources.transfer import HashingWriter, receive_file, status_error
from ops.models.store import STAGING, Store

PEER_TOKEN = "BAKEHOUSE_PEER_TOKEN"
POLL_SECONDS = 0.2  # how long a host waits to ask again after a peer answered 425 (still fetching that file)
# A question for a file still on its way is held this long, looking for the file every ARRIVAL_CHECK_SECONDS, and answered as soon
# as it lands: 8 hosts asking 5 times a second for each of their files cost a core a quarter of its time in connections and 425s.
HOLD_SECONDS = 2.0
ARRIVAL_CHECK_SECONDS = 0.05
PEER_TIMEOUT = 30.0  # seconds a peer may stay silent, connecting or mid-file, before it is dropped
READ_BYTES = 1 << 20


def file_path(root: Path, name: str, commit: str, path: str) -> Path | None:
    """The store file a peer may serve, or None: a validated name, commit and path, a real file under real directories.

    A commit directory's file (activated, so verified), else one this host's `fetch --share` already matched against the lock.
    """
    rel = _valid(name, commit, path)
    if rel is None:
        return None
    store = Store(root)
    for target in (store.commit_dir(name, commit) / rel, store.ready_dir(name, commit) / rel):
        try:
            safefs.check_no_link(root, target)
            if stat.S_ISREG(os.lstat(target).st_mode):
                return target
        except (BakehouseError, OSError):
            continue
    return None


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


def peer_app(root: Path, token: str, *, coming: Collection[tuple[str, str]] = (), max_rate: int = 0, deadline: float = 0.0) -> Any:
    """The ASGI app: GET or HEAD /<name>/<commit>/<path> with `Authorization: Bearer <token>`; 425 for a file still on its way here."""
    import anyio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, PlainTextResponse, Response
    from starlette.routing import Route

    class BigChunks(FileResponse):
        chunk_size = 1 << 20  # Starlette's 64 KiB costs a thread hop per chunk: 1.8 s of a core per GB served, 0.7 s with 1 MiB

    async def serve_file(request: Request) -> Response:
        if deadline and time.time() > deadline:
            return PlainTextResponse("this peer's run is over", status_code=410)
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return PlainTextResponse("unauthorized", status_code=401)
        p = request.path_params
        target = file_path(root, p["name"], p["commit"], p["path"])
        held = time.monotonic() + HOLD_SECONDS
        while target is None and still_coming(root, p["name"], p["commit"], p["path"], coming) and time.monotonic() < held:
            await anyio.sleep(ARRIVAL_CHECK_SECONDS)
            target = file_path(root, p["name"], p["commit"], p["path"])
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


def serve(root: Path, bind: str, port: int, token_file: Path, port_file: Path, *, lock: Path | None = None, max_rate: int = 0, seconds: float = 3600) -> int:
    """Run until the deadline: read (and remove) the token file, write the port we bound to, serve."""
    coming = frozenset((m.name, m.commit) for m in load_lock(lock).models.values()) if lock else frozenset()
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
    config = uvicorn.Config(peer_app(root, token, coming=coming, max_rate=max_rate, deadline=time.time() + seconds), log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
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
    for ready in (root / STAGING).glob("*/*.ready"):
        name, commit = ready.parent.name, ready.name.removesuffix(".ready")
        with contextlib.suppress(BakehouseError, OSError):
            if stat.S_ISDIR(os.lstat(store.commit_dir(name, commit)).st_mode):
                safefs.remove(root, ready)


def fetch_from_peers(model: LockedModel, files: Sequence[LockedFile], job: FetchJob, peers: Sequence[str], token: str) -> tuple[dict[str, str], list[LockedFile], list[str]]:
    """Take each file from the first peer that serves the locked bytes, `job.workers` files at once.

    Returns the verified hashes, the files no peer could give (the source fetches those), and what went wrong with which peer.
    """
    known: dict[str, str] = {}
    left: list[LockedFile] = []
    notes: list[str] = []
    dropped: set[str] = set()
    guard = threading.Lock()
    headers = {"authorization": f"Bearer {token}"}

    def one(f: LockedFile) -> None:
        for peer in peers:
            with guard:
                if peer in dropped:
                    continue
            url = f"{peer}/{model.name}/{model.commit}/{f.path}"
            try:
                await_file(url, headers, job, source=f"peer {peer}")
                sha = take_file(url, headers, f, job, source=f"peer {peer}")
            except (VerificationError, SourceError) as exc:
                with guard:
                    if peer not in dropped:  # workers waiting on the same peer all fail at once: one line says it
                        notes.append(_note(peer, f, exc))
                    dropped.add(peer)
                continue
            with guard:
                known[f.path] = sha
            return
        with guard:
            left.append(f)

    ordered = sorted(files, key=lambda x: x.size, reverse=True)
    with ThreadPoolExecutor(max_workers=max(1, min(job.workers, len(ordered))), thread_name_prefix="peer") as pool:
        try:
            list(pool.map(one, ordered))
        except BaseException:
            job.cancel.set()  # Ctrl-C or a failure: workers waiting on a peer still fetching stop at their next ask, so the pool can end
            raise
    return known, left, notes


def take_file(url: str, headers: dict[str, str], f: LockedFile, job: FetchJob, *, source: str) -> str:
    """One file from a peer into staging, resumed with Range from what job.partial holds, hashed as it arrives, checked against the lock.

    Read with http.client straight into one buffer: through httpx and the hub client's 10 MB chunks, receiving took
    four times the CPU (2.0 s of a core for a 297 MB file, against 0.5 s), and a host that passes files on is short of CPU.
    Never more than the lock's size is read: a peer sending more cannot fill the disk.
    """
    parts = urllib.parse.urlsplit(url)

    def fill(writer: HashingWriter, have: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=PEER_TIMEOUT)
        try:
            conn.request("GET", parts.path, headers=headers | ({"range": f"bytes={have}-"} if have else {}))
            answer = conn.getresponse()
            if answer.status == 200 and have:
                writer.truncate(0)  # the peer sent the whole file, not the rest
            elif answer.status == 206 and not (answer.getheader("content-range") or "").startswith(f"bytes {have}-"):
                served = (answer.getheader("content-range") or "no Content-Range").removeprefix("bytes ")
                raise SourceUnreachableError(f"{source}: answered {f.path} from bytes {served}, not from byte {have} as asked. "
                                             "Another peer or the origin gives it; completed bytes are kept.")
            elif answer.status not in (200, 206):
                raise status_error(source, answer.status, answer.read(200).decode(errors="replace"))
            buffer = memoryview(bytearray(READ_BYTES))
            while (left := f.size - writer.tell()) > 0 and (n := answer.readinto(buffer[: min(left, READ_BYTES)])):
                writer.write(buffer[:n])
        except (OSError, http.client.HTTPException) as exc:
            raise SourceUnreachableError(f"{source}: cannot download {f.path} ({type(exc).__name__}: {exc}). Another peer or the origin gives it; "
                                         "completed bytes are kept.") from exc
        finally:
            conn.close()
        if writer.tell() < f.size:
            raise SourceUnreachableError(f"{source}: {f.path} ended after {writer.tell()} of {f.size} bytes. Another peer or the origin gives the rest.")

    return receive_file(f, job, fill)


def await_file(url: str, headers: dict[str, str], job: FetchJob, *, source: str) -> None:
    """Ask until the peer has the file: while it answers 425 it is still fetching it (fetch --share); any other answer but 200 is its failure."""
    parts = urllib.parse.urlsplit(url)
    while True:
        # A connection per question: one kept open across polls would be closed by the peer's idle timeout and read as its death.
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=PEER_TIMEOUT)
        try:
            conn.request("HEAD", parts.path, headers=headers)
            answer = conn.getresponse()
            answer.read()
        except (OSError, http.client.HTTPException) as exc:
            raise SourceUnreachableError(f"{source}: cannot ask for {parts.path} ({type(exc).__name__}: {exc}). Another peer or the origin gives it.") from exc
        finally:
            conn.close()
        if answer.status == 200:
            return
        if answer.status != 425:
            raise status_error(source, answer.status, answer.reason)
        if job.cancel.wait(POLL_SECONDS):
            raise Cancelled()


def _note(peer: str, f: LockedFile, exc: BakehouseError) -> str:
    if isinstance(exc, VerificationError):
        return f"peer {peer} served other bytes than the lock pins for {f.path}; dropped it and took the file elsewhere"
    return f"peer {peer} failed for {f.path} ({str(exc).split('(')[0].strip()}); dropped it and took the file elsewhere"
