"""Taking a file piece by piece from peers (cut-through), for a lock with pieces.

Each piece is asked of one peer: piece k of its stripe's source first
(`sources[k % stripes]`: the controller gives a host one source per stripe,
so that every host sends as much as it receives), then of the other live
peers. `stripes` pieces are in flight at once, each written at its offset and
checked against the lock's sha256 for it as it arrives; a verified piece is
offered onward at once (`job.on_pieces`), while the rest of the file still
arrives. A piece that fails its hash, or a peer that fails mid-piece, costs
that piece: the peer is dropped (and named), the piece is asked of the next.
The whole file is hashed in order as its pieces complete (read back from the
page cache) and must match the lock's sha256 before it enters staging.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence

from ops.errors import BadPieceError, BakehouseError, Cancelled, PeerError, VerificationError
from ops.models import safefs
from ops.models.lock import LockedFile, LockedModel
from ops.models.sources.base import FetchJob

POLL_SECONDS = 0.2  # how long to wait before asking again a peer that answered 425 (it has not verified that piece yet)
PEER_TIMEOUT = 30.0
READ_BYTES = 1 << 20


class Pieces:
    """Which pieces of one file are here and verified, shared by the workers and the in-order hash."""

    def __init__(self, f: LockedFile, on_change: Callable[[str], None]) -> None:
        self.have = bytearray(b"0" * len(f.pieces))
        self.cond = threading.Condition()
        self.failed: BaseException | None = None
        self._on_change = on_change

    def add(self, k: int) -> None:
        with self.cond:
            self.have[k] = ord("1")
            self.cond.notify_all()
            self._on_change(self.have.decode())

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            self.failed = self.failed or exc
            self.cond.notify_all()

    def wait_for(self, k: int, cancelled: Callable[[], bool]) -> None:
        with self.cond:
            while self.have[k] != ord("1") and self.failed is None:
                if cancelled():
                    raise Cancelled()
                self.cond.wait(0.5)
            if self.failed is not None:
                raise self.failed

    def prefix(self) -> int:
        """How many leading pieces are here."""
        return (self.have.decode() + "0").index("0")


def take_pieces(model: LockedModel, f: LockedFile, job: FetchJob, sources: Sequence[str], stripes: int, live: Callable[[], list[str]],
                drop: Callable[[str, str], None], headers: dict[str, str]) -> str | None:
    """The file into staging from peers, verified; None when no peer could give some piece (the origin gives the file then)."""
    partial, final = job.partial / f.path, job.staging / f.path
    fd = safefs.open_file(job.root, partial, os.O_RDWR | os.O_CREAT)
    try:
        pieces = Pieces(f, lambda have: job.on_pieces(f.path, have))
        _keep_good(fd, f, pieces, job)
        os.ftruncate(fd, f.size)
        todo = deque(k for k in range(len(f.pieces)) if pieces.have[k] != ord("1"))
        guard = threading.Lock()

        def worker() -> None:
            try:
                while True:
                    with guard:
                        if not todo or pieces.failed is not None:
                            return
                        k = todo.popleft()
                    _one_piece(model, f, k, fd, job, _preferred(k, sources, stripes, live()), drop, headers)
                    pieces.add(k)
            except BaseException as exc:
                pieces.fail(exc)

        threads = [threading.Thread(target=worker, name=f"piece-{i}", daemon=True) for i in range(max(1, min(stripes, len(todo))))]
        for t in threads:
            t.start()
        try:
            sha = _hash_in_order(fd, f, pieces, job)
        except PeerError:
            os.ftruncate(fd, pieces.prefix() * f.piece_size)  # the origin resumes a file from its end: only the unbroken prefix is kept
            return None
        finally:
            pieces.fail(Cancelled())
            for t in threads:
                t.join()
        if sha != f.sha256:
            partial.unlink()
            raise VerificationError(f"{f.path}: every piece matched models.lock but the whole file's sha256 is {sha}, not {f.sha256}: the lock's "
                                    "pieces do not add up to its file. Regenerate it with `invoke lock-models --pieces` and review the diff.")
        job.on_verified(f.path, partial)
        os.fsync(fd)
    finally:
        os.close(fd)
    safefs.makedirs(job.root, final.parent)
    os.replace(partial, final)
    return sha


def _preferred(k: int, sources: Sequence[str], stripes: int, alive: list[str]) -> list[str]:
    """Piece k's stripe source first (while it lives), then every other live peer in the controller's order."""
    first = sources[k % stripes] if len(sources) >= stripes > 0 else None
    return ([first] if first in alive else []) + [p for p in alive if p != first]


def _keep_good(fd: int, f: LockedFile, pieces: Pieces, job: FetchJob) -> None:
    """Pieces a crash (or an earlier try from the origin) left in the partial file: each checked again, the good ones kept."""
    there = os.fstat(fd).st_size
    for k in range(len(f.pieces)):
        start, length = f.piece_range(k)
        if start + length > there:
            break
        if hashlib.sha256(os.pread(fd, length, start)).hexdigest() == f.pieces[k]:
            pieces.add(k)
            job.progress.update(length)


def _one_piece(model: LockedModel, f: LockedFile, k: int, fd: int, job: FetchJob, order: list[str], drop: Callable[[str, str], None],
               headers: dict[str, str]) -> None:
    for peer in order:
        try:
            pull_piece(f"{peer}/{model.name}/{model.commit}/{f.path}", headers, f, k, fd, job, peer=peer)
            return
        except BadPieceError as exc:
            drop(peer, f"peer {peer} served a bad piece ({exc.index}) of {f.path}; dropped it and took the piece elsewhere")
        except PeerError as exc:
            drop(peer, f"peer {peer} failed for {f.path} ({exc.why}); dropped it and took the rest elsewhere")
    raise PeerError.of("(none left)", f.path, f"no live peer gave piece {k}")


def pull_piece(url: str, headers: dict[str, str], f: LockedFile, k: int, fd: int, job: FetchJob, *, peer: str) -> None:
    """Piece k from one peer, written at its offset and hashed as it arrives; 425 (not verified there yet) is asked again."""
    parts = urllib.parse.urlsplit(url)
    start, length = f.piece_range(k)
    asked = f"bytes {start}-{start + length - 1}/"
    buffer = memoryview(bytearray(min(READ_BYTES, length)))
    while True:
        # A connection per piece: one kept open while a peer holds a 425 would be closed by its idle timeout and read as its death.
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=PEER_TIMEOUT)
        got = 0
        try:
            conn.request("GET", parts.path, headers=headers | {"range": f"bytes={start}-{start + length - 1}"})
            answer = conn.getresponse()
            if answer.status == 425:
                answer.read()
                if job.cancel.wait(POLL_SECONDS):
                    raise Cancelled()
                continue
            if answer.status != 206 or not (answer.getheader("content-range") or "").startswith(asked):
                raise PeerError.of(peer, f.path, f"answered {answer.status} {answer.getheader('content-range') or ''} when asked for {asked.rstrip('/')}")
            digest = hashlib.sha256()
            while got < length and (n := answer.readinto(buffer[: min(len(buffer), length - got)])):
                if job.cancel.is_set():
                    raise Cancelled()
                os.pwrite(fd, buffer[:n], start + got)
                digest.update(buffer[:n])
                got += n
                job.progress.update(n)
            if got < length:
                raise PeerError.of(peer, f.path, f"ended after {got} of {length} bytes of piece {k}")
            if digest.hexdigest() != f.pieces[k]:
                raise BadPieceError(f.path, k, source=peer)
            return
        except BakehouseError:  # before OSError: a PeerError is one
            job.progress.update(-got)
            raise
        except (OSError, http.client.HTTPException) as exc:
            job.progress.update(-got)
            raise PeerError.of(peer, f.path, f"{type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()


def _hash_in_order(fd: int, f: LockedFile, pieces: Pieces, job: FetchJob) -> str:
    """The whole file's sha256, each piece read back (from the page cache) as soon as it and all before it are here."""
    digest = hashlib.sha256()
    for k in range(len(f.pieces)):
        pieces.wait_for(k, job.cancel.is_set)
        start, length = f.piece_range(k)
        for at in range(start, start + length, 8 << 20):
            digest.update(os.pread(fd, min(8 << 20, start + length - at), at))
    return digest.hexdigest()
