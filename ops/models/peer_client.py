"""The peer client: a host takes files from its peers (ops.models.peer_server), each hashed as it arrives and checked against the lock.

The lock's sha256s are the only thing trusted, so a host takes bytes from any
peer without trusting it. A peer that answers 425 is still fetching the file
and is asked again; a peer that fails or serves other bytes is dropped for the
rest of the fetch, and the file is taken from the next peer or the origin.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ops.errors import Cancelled, PeerError, SourceError, VerificationError
from ops.models.lock import LockedFile, LockedModel
from ops.models.peer_pieces import take_pieces
from ops.models.sources.base import FetchJob
from ops.models.sources.transfer import HashingWriter, receive_file

POLL_SECONDS = 0.2  # how long a host waits to ask again after a peer answered 425 (still fetching that file)
PEER_TIMEOUT = 30.0  # seconds a peer may stay silent, connecting or mid-file, before it is dropped
READ_BYTES = 1 << 20


def fetch_from_peers(model: LockedModel, files: Sequence[LockedFile], job: FetchJob, peers: Sequence[str], token: str,
                     stripes: int = 1) -> tuple[dict[str, str], list[LockedFile], list[str]]:
    """Take each file from the first peer that serves the locked bytes, `job.workers` files at once; a file with pieces piece by
    piece (ops.models.peer_pieces), piece k from the first `stripes` peers in turn.

    Returns the verified hashes, the files no peer could give (the source fetches those), and what went wrong with which peer.
    """
    known: dict[str, str] = {}
    left: list[LockedFile] = []
    notes: list[str] = []
    dropped: set[str] = set()
    guard = threading.Lock()
    headers = {"authorization": f"Bearer {token}"}

    def drop(peer: str, note: str) -> None:
        with guard:
            if peer not in dropped:  # workers waiting on the same peer all fail at once: one line says it
                notes.append(note)
            dropped.add(peer)

    def live() -> list[str]:
        with guard:
            return [p for p in peers if p not in dropped]

    def one(f: LockedFile) -> None:
        if f.pieces:
            sha = take_pieces(model, f, job, peers, stripes, live, drop, headers)
            with guard:
                if sha:
                    known[f.path] = sha
                else:
                    left.append(f)
            return
        for peer in peers:
            with guard:
                if peer in dropped:
                    continue
            url = f"{peer}/{model.name}/{model.commit}/{f.path}"
            try:
                await_file(url, headers, job, peer=peer)
                sha = take_file(url, headers, f, job, peer=peer)
            except (VerificationError, SourceError) as exc:
                drop(peer, _note(peer, f, exc))
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


def take_file(url: str, headers: dict[str, str], f: LockedFile, job: FetchJob, *, peer: str) -> str:
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
                raise PeerError.of(peer, f.path, f"answered from bytes {served}, not from byte {have} as asked")
            elif answer.status not in (200, 206):
                raise PeerError.of(peer, f.path, f"answered {answer.status} {answer.reason}")
            buffer = memoryview(bytearray(READ_BYTES))
            while (left := f.size - writer.tell()) > 0 and (n := answer.readinto(buffer[: min(left, READ_BYTES)])):
                writer.write(buffer[:n])
        except (OSError, http.client.HTTPException) as exc:
            raise PeerError.of(peer, f.path, f"{type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()
        if writer.tell() < f.size:
            raise PeerError.of(peer, f.path, f"ended after {writer.tell()} of {f.size} bytes")

    return receive_file(f, job, fill)


def await_file(url: str, headers: dict[str, str], job: FetchJob, *, peer: str) -> None:
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
            raise PeerError.of(peer, parts.path, f"{type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()
        if answer.status == 200:
            return
        if answer.status != 425:
            raise PeerError.of(peer, parts.path, f"answered {answer.status} {answer.reason}")
        if job.cancel.wait(POLL_SECONDS):
            raise Cancelled()


def _note(peer: str, f: LockedFile, exc: VerificationError | SourceError) -> str:
    if isinstance(exc, PeerError):
        return f"peer {peer} failed for {f.path} ({exc.why}); dropped it and took the file elsewhere"
    if isinstance(exc, VerificationError):
        return f"peer {peer} served other bytes than the lock pins for {f.path}; dropped it and took the file elsewhere"
    return f"peer {peer} failed for {f.path} ({type(exc).__name__}); dropped it and took the file elsewhere"
