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
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence

from ops.errors import BadPieceError, BakehouseError, Cancelled, PeerError, VerificationError
from ops.models import safefs
from ops.models.lock import LockedFile, LockedModel
from ops.models.sources.base import FetchJob
from ops.models.sources.transfer import into_staging

POLL_SECONDS = 0.2  # how long to wait before asking again a peer that answered 425 (it has not verified that piece yet)
PEER_TIMEOUT = 30.0
READ_BYTES = 1 << 20
# A peer sending a piece SLOW_FACTOR times slower than this file's pieces have come (the median, once there are PACE_SAMPLES) is
# dropped like a failed one, and the piece asked of the next: one host on a bad link would otherwise slow every host below it.
# Only the sending counts, not the wait for a piece the peer does not have yet (its own source is behind: that heals above it).
SLOW_FACTOR = 8.0
MIN_PIECE_SECONDS = 5.0
PACE_SAMPLES = 3
# Rounds in which every live peer lacked a piece while its stripe source was gone: then no peer will have it (they all dropped
# that source too, say), and the file is taken from the origin instead.
GIVE_UP_ROUNDS = 5


class Pace:
    """How fast this file's pieces have come from peers, shared by its workers: what counts as too slow for the next."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.lock = threading.Lock()

    def add(self, nbytes: int, seconds: float) -> None:
        with self.lock:
            self.rates.append(nbytes / max(seconds, 1e-6))

    def deadline(self, nbytes: int) -> float:
        """Seconds a piece of `nbytes` may take to arrive once its peer starts sending it (infinite until there are samples)."""
        with self.lock:
            if len(self.rates) < PACE_SAMPLES:
                return float("inf")
            median = sorted(self.rates)[len(self.rates) // 2]
        return max(MIN_PIECE_SECONDS, SLOW_FACTOR * nbytes / median)


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
    partial = job.partial / f.path
    fd = safefs.open_file(job.root, partial, os.O_RDWR | os.O_CREAT)
    try:
        pieces = Pieces(f, lambda have: job.on_pieces(f.path, have))
        _keep_good(fd, f, pieces, job)
        os.ftruncate(fd, f.size)
        todo = deque(k for k in range(len(f.pieces)) if pieces.have[k] != ord("1"))
        guard = threading.Lock()
        pace = Pace()

        def order_for(k: int) -> Callable[[], list[str]]:
            return lambda: _preferred(k, sources, stripes, live())

        def worker() -> None:
            try:
                while True:
                    with guard:
                        if not todo or pieces.failed is not None:
                            return
                        k = todo.popleft()
                    _one_piece(model, f, k, fd, job, sources[k % stripes] if len(sources) >= stripes > 0 else None,
                               order_for(k), drop, headers, pace)
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
        into_staging(job, f, fd)
    finally:
        os.close(fd)
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


def _one_piece(model: LockedModel, f: LockedFile, k: int, fd: int, job: FetchJob, primary: str | None, order: Callable[[], list[str]],
               drop: Callable[[str, str], None], headers: dict[str, str], pace: Pace) -> None:
    """Piece k from the first live peer in `order` that gives it. Its stripe's source (`primary`) is waited for while it does not
    have the piece yet; any other peer that does not have it is passed over, and the round starts again: a peer standing in for a
    dropped source may itself be waiting for this host, and waiting on it would wait for ever. Without the source, after
    GIVE_UP_ROUNDS rounds in which no peer had the piece, PeerError: the origin gives the file."""
    rounds_without_source = 0
    while (peers := order()) and rounds_without_source < GIVE_UP_ROUNDS:
        for peer in peers:
            try:
                if pull_piece(f"{peer}/{model.name}/{model.commit}/{f.path}", headers, f, k, fd, job, peer=peer, pace=pace, patient=peer == primary):
                    return
            except BadPieceError as exc:
                drop(peer, f"peer {peer} served a bad piece ({exc.index}) of {f.path}; dropped it and took the piece elsewhere")
            except PeerError as exc:
                drop(peer, f"peer {peer} failed for {f.path} ({exc.why}); dropped it and took the rest elsewhere")
        if primary not in order():  # the stripe's source is gone: the others are asked a bounded number of rounds
            rounds_without_source += 1
        if job.cancel.wait(POLL_SECONDS):
            raise Cancelled()
    raise PeerError.of("(none left)", f.path, f"no live peer gave piece {k}")


def pull_piece(url: str, headers: dict[str, str], f: LockedFile, k: int, fd: int, job: FetchJob, *, peer: str, pace: Pace | None = None,
               patient: bool = True) -> bool:
    """Piece k from one peer, written at its offset and hashed as it arrives: True once it is here. A 425 (not verified there
    yet, after the peer held the question a moment) is asked again when `patient`, else False. A peer sending the piece far
    slower than the file's other pieces came (`pace`) fails."""
    parts = urllib.parse.urlsplit(url)
    start, length = f.piece_range(k)
    asked = f"bytes {start}-{start + length - 1}/"
    while True:
        # A connection per piece: one kept open while a peer holds a 425 would be closed by its idle timeout and read as its death.
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=PEER_TIMEOUT)
        got = 0
        try:
            conn.request("GET", parts.path, headers=headers | {"range": f"bytes={start}-{start + length - 1}"})
            answer = conn.getresponse()
            if answer.status == 425:
                answer.read()
                if not patient:
                    return False
                if job.cancel.wait(POLL_SECONDS):
                    raise Cancelled()
                continue
            if answer.status != 206 or not (answer.getheader("content-range") or "").startswith(asked):
                raise PeerError.of(peer, f.path, f"answered {answer.status} {answer.getheader('content-range') or ''} when asked for {asked.rstrip('/')}")
            digest = hashlib.sha256()
            began, allowed = time.monotonic(), pace.deadline(length) if pace else float("inf")
            # read1: what has arrived (up to 1 MiB), not a full buffer, so a peer trickling bytes is seen as slow while it trickles
            while got < length and (data := answer.read1(min(READ_BYTES, length - got))):
                if job.cancel.is_set():
                    raise Cancelled()
                if time.monotonic() - began > allowed:
                    raise PeerError.of(peer, f.path, f"too slow: piece {k} not sent in {allowed:.1f} s, {SLOW_FACTOR:g} times the time this file's pieces take")
                os.pwrite(fd, data, start + got)
                digest.update(data)
                got += len(data)
                job.progress.update(len(data))
            if got < length:
                raise PeerError.of(peer, f.path, f"ended after {got} of {length} bytes of piece {k}")
            if digest.hexdigest() != f.pieces[k]:
                raise BadPieceError(f.path, k, source=peer)
            if pace is not None:
                pace.add(length, time.monotonic() - began)
            return True
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
