"""HTTP downloads for hub and https sources, through huggingface_hub's `http_get`; the receiving end shared with peers.

`http_get` brings retries, resume with Range and the hub's error types; we hand
it a file object that hashes every byte as it is written, so a finished
download is already verified without reading it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import BinaryIO, cast

from ops.errors import (
    BadPieceError,
    Cancelled,
    RangesNotSupported,
    SourceAuthError,
    SourceError,
    SourceNotFoundError,
    SourceRefusedError,
    SourceUnreachableError,
    VerificationError,
    redact,
)
from ops.models import safefs
from ops.models.lock import LockedFile
from ops.models.pieces import PieceCheck, prefix_bits
from ops.models.sources.base import FetchJob

log = logging.getLogger("bakehouse.fetch")


class HashingWriter:
    """The file object given to http_get: hashes what it writes (and checks each piece, for a lock with pieces), survives a server ignoring Range."""

    def __init__(self, f: BinaryIO, on_bytes: Callable[[int], None], cancel: Callable[[], bool], check: PieceCheck | None = None) -> None:
        self._f, self._on_bytes, self._cancelled, self.check = f, on_bytes, cancel, check
        self._digest = self._rehash(f.tell())

    def _rehash(self, upto: int) -> hashlib._Hash:
        """The hash of the first `upto` bytes on disk; with pieces, they are checked too, and kept only up to the last good piece."""
        digest = hashlib.sha256()
        if self.check is not None:
            self.check.reset(0)
        self._f.seek(0)
        remaining = upto
        while remaining and (chunk := self._f.read(min(remaining, 8 << 20))):
            if self.check is not None:
                try:
                    self.check.update(chunk)
                except BadPieceError:  # bytes a crash or a lying source left: what follows the last good piece is fetched again
                    good = self.check.verified
                    self._on_bytes(good - os.fstat(self._f.fileno()).st_size)
                    self._f.truncate(good)
                    return self._rehash(good)
            digest.update(chunk)
            remaining -= len(chunk)
        self._f.seek(upto)
        return digest

    def write(self, data: bytes | memoryview) -> int:
        if self._cancelled():
            raise Cancelled()
        self._f.write(data)
        self._digest.update(data)
        self._on_bytes(len(data))
        if self.check is not None:
            self.check.update(data)
        return len(data)

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        """http_get rewinds and truncates when the server answers a Range request with the whole file; a bad piece is cut off the same way."""
        before = os.fstat(self._f.fileno()).st_size
        at = self._f.truncate(size)
        self._on_bytes(at - before)
        self._digest = self._rehash(at)
        return at

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@dataclass(frozen=True)
class Download:
    url: str
    headers: dict[str, str]
    file: LockedFile


def download_file(d: Download, job: FetchJob, *, source: str) -> str:
    """One file into staging: a large one by concurrent ranged GETs (ops.models.sources.ranged), else streamed through the hub
    client, resuming from bytes already under job.partial."""
    from ops.models.sources import ranged

    if job.ranges is not None and ranged.applies(d.url, d.file.size):
        try:
            return ranged.ranged_download(d.url, d.headers, d.file, job, source=source)
        except RangesNotSupported:
            log.info("%s: the server does not answer Range requests; %s comes in one stream", source, d.file.path)
    if job.ranges is not None and (job.ranges / d.file.path).exists():  # chunks of an earlier ranged try: not a prefix to resume from
        safefs.remove(job.root, job.ranges / d.file.path)
        safefs.remove(job.root, job.partial / d.file.path)
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars("huggingface_hub.http_get")  # our own Progress sums all files; the hub client's per-file bars would interleave

    def fill(writer: HashingWriter, have: int) -> None:
        with translate_http_errors(source):
            http_get(d.url, cast(BinaryIO, writer), resume_size=have, headers=d.headers, expected_size=d.file.size, displayed_filename=d.file.path)

    return receive_file(d.file, job, fill)


def receive_file(file: LockedFile, job: FetchJob, fill: Callable[[HashingWriter, int], None]) -> str:
    """One file into staging: `fill` writes its bytes (after the `have` already under job.partial) into a writer that
    hashes them; the whole is synced, checked against the lock's sha256, and only then moved into staging."""
    partial = job.partial / file.path
    fd = safefs.open_file(job.root, partial, os.O_RDWR | os.O_CREAT)
    with os.fdopen(fd, "r+b") as f:
        have = f.seek(0, os.SEEK_END)
        if have > file.size:
            f.truncate(0)
            have = f.seek(0)
        job.progress.update(have)
        check = piece_check(file, job)
        writer = HashingWriter(f, job.progress.update, job.cancel.is_set, check)
        fill(writer, writer.tell())
        f.flush()
        sha = writer.hexdigest()
        if sha != file.sha256:
            partial.unlink()
            if check is not None and check.verified == file.size:
                raise VerificationError(f"{file.path}: every piece matched models.lock but the whole file's sha256 is {sha}, not {file.sha256}: the lock's "
                                        "pieces do not add up to its file. Regenerate it with `invoke lock-models --pieces` and review the diff.")
            raise VerificationError(
                f"{file.path}: downloaded sha256 {sha}, models.lock pins {file.sha256}. The source now serves other bytes "
                f"at this commit: nothing was activated. If the change is intended, re-run `invoke lock-models` and review the diff."
            )
        into_staging(job, file, f.fileno())
    return sha


def into_staging(job: FetchJob, file: LockedFile, fd: int) -> None:
    """A partial file whose bytes matched the lock: offered to peers, synced, then moved into staging.

    Offered before the sync: its bytes are the lock's, and a peer reads them from memory while the disk catches up.
    The sync still comes before the file enters staging, so a crash never leaves unsynced bytes where a re-run trusts them.
    (Synced first, each hop down a chain of hosts waited for its disk: 8 hosts took 3 s longer on a shared disk.)
    """
    partial, final = job.partial / file.path, job.staging / file.path
    job.on_verified(file.path, partial)
    os.fsync(fd)
    safefs.makedirs(job.root, final.parent)
    os.replace(partial, final)


def piece_check(file: LockedFile, job: FetchJob) -> PieceCheck | None:
    """For a lock with pieces: each piece checked as it completes, and the verified prefix offered to peers (fetch --share)."""
    if not file.pieces:
        return None
    return PieceCheck(file.path, file.size, file.piece_size, file.pieces,
                      lambda verified: job.on_pieces(file.path, prefix_bits(verified, file.piece_size, len(file.pieces))))


def download_all(downloads: Sequence[Download], job: FetchJob, *, source: str) -> dict[str, str]:
    """Download in parallel, largest first; the first failure or Ctrl-C stops every worker."""
    ordered = sorted(downloads, key=lambda d: d.file.size, reverse=True)
    if not ordered:
        return {}
    pool = ThreadPoolExecutor(max_workers=max(1, min(job.workers, len(ordered))), thread_name_prefix="fetch")
    futures = {pool.submit(download_file, d, job, source=source): d.file.path for d in ordered}
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() and not isinstance(f.exception(), Cancelled)]
        if failed:
            raise failed[0].exception() or RuntimeError("a download failed")
        return {futures[f]: f.result() for f in futures}
    finally:
        job.cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def translate_http_errors(source: str) -> Iterator[None]:
    """Turn hub and transport exceptions into bakehouse errors that say what to do."""
    import httpx2  # the hub client's transport, imported with it by the sources that use this (not at start: peers and verify need neither)
    from huggingface_hub import errors as hf_errors

    source = redact(source)
    try:
        yield
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.EntryNotFoundError) as exc:
        raise SourceNotFoundError(
            f"{source}: {_first_line(exc)}. Check the repository, revision and file names in models.toml; "
            "for a private or gated repository set HF_TOKEN to a token with access."
        ) from exc
    except hf_errors.GatedRepoError as exc:
        raise SourceAuthError(f"{source}: the repository is gated. Accept its terms on the hub, then set HF_TOKEN to a token of that account.") from exc
    except hf_errors.HfHubHTTPError as exc:
        raise status_error(source, exc.response.status_code if exc.response is not None else 0, _first_line(exc)) from exc
    except httpx2.HTTPStatusError as exc:
        raise status_error(source, exc.response.status_code, str(exc)) from exc
    except (httpx2.TransportError, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)) and "Consistency check" not in str(exc):
            raise
        raise SourceUnreachableError(
            f"{source}: cannot download ({redact(str(exc)) or type(exc).__name__}). Check that the server is up and reachable, "
            "HF_ENDPOINT, and proxy settings (https_proxy); then re-run: completed bytes are kept."
        ) from exc


def status_error(source: str, status: int, detail: str) -> SourceError:
    detail = redact(detail)
    if status in (401, 403):
        return SourceAuthError(f"{source}: authentication refused (HTTP {status}). Set HF_TOKEN to a token with read access to this repository "
                               "(for gated models, accept the terms on the hub first); for an https:// source, check the credentials it needs.")
    if status == 404:
        return SourceNotFoundError(f"{source}: not found (HTTP 404). Check the names in models.toml and the lock's commit.")
    if status == 429:
        return SourceError(f"{source}: rate limited (HTTP 429). Retry later, or use a token (HF_TOKEN) with a higher limit; completed bytes are kept.")
    if 400 <= status < 500:
        return SourceRefusedError(f"{source}: the server refused the request (HTTP {status}: {detail}). Retrying will not change that: "
                                  "check HF_ENDPOINT, the source URL and any proxy in between.")
    return SourceError(f"{source}: the server answered HTTP {status} ({detail}). Retry later; completed bytes are kept.")


def _first_line(exc: Exception) -> str:
    return redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
