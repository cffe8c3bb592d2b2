"""Download + full verify + activate, for one store, resumable at any point.

A model moves through three places, and only the last is ever loaded:
`.staging/<name>/<commit>.partial` (bytes arriving) -> `.staging/<name>/<commit>`
(complete files) -> `<name>/<commit>` (verified, stamped), then `current` flips.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ops.errors import BakehouseError, ConfigError, DiskSpaceError, VerificationError
from ops.models import safefs
from ops.models.lock import LockedFile, LockedModel
from ops.models.peer_client import fetch_from_peers
from ops.models.progress import Progress
from ops.models.report import Outcome, Status
from ops.models.sources import FetchJob, source_for
from ops.models.sources.ranged import Budget
from ops.models.stamp import STAMP_NAME
from ops.models.store import Store
from ops.models.verify import verify, verify_one
from ops.units import format_bytes, format_rate

log = logging.getLogger("bakehouse.fetch")


@dataclass(frozen=True)
class Peers:
    """Hosts that may hold the verified files already (http://addr:port), tried in order before the source, and this run's secret.

    `share`: offer each file to this host's own peers as soon as its bytes matched the lock (Store.share), not only once the model is active.
    """

    urls: tuple[str, ...] = ()
    token: str = ""
    share: bool = False
    stripes: int = 1  # files with pieces: piece k is asked of urls[k % stripes] first


def fetch_locked(models: Sequence[LockedModel], store: Store, *, workers: int = 8, tty: bool | None = None, peers: Peers | None = None) -> list[Outcome]:
    """Fetch every model; one model's failure is reported and does not stop the others."""
    if not store.writable():
        return [_read_only(store, m) for m in models]
    store.ensure_root()
    outcomes: dict[str, Outcome] = {}
    todo = []
    for m in models:
        try:
            store.check_links(m.name)
            # Under the model's lock: the check may repair (move aside) a damaged copy another fetch is writing.
            with store.locked(m.name):
                store.clean_ready(m.name, m.commit)  # what an earlier fetch --share offered (its peer server is gone)
                ready = _already_there(store, m)
        except (BakehouseError, OSError) as exc:
            outcomes[m.name] = Outcome.failed(m.name, _as_error(store, m, exc), commit=m.commit)
            continue
        if ready:
            outcomes[m.name] = ready
        else:
            todo.append(m)
    preflight(store, todo)
    for m in todo:
        try:
            outcomes[m.name] = _fetch_one(store, m, workers=workers, tty=tty, peers=peers or Peers())
        except (BakehouseError, OSError) as exc:
            outcomes[m.name] = Outcome.failed(m.name, _as_error(store, m, exc), commit=m.commit)
    return [outcomes[m.name] for m in models]


def _as_error(store: Store, m: LockedModel, exc: BaseException) -> BakehouseError:
    """An OS error while changing the store, said as what it means and what to do."""
    if isinstance(exc, BakehouseError):
        return exc
    assert isinstance(exc, OSError)
    where = exc.filename or store.root
    if exc.errno == errno.ENOSPC:
        error: BakehouseError = DiskSpaceError(f"{m.name}: the disk at {store.root} filled up. Completed bytes are kept in .staging; free space and re-run.",
                                               path=str(store.root))
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        error = ConfigError(f"{m.name}: cannot write {where} ({exc.strerror}). Pass --dest DIR (MODELS_DIR) on a store this user can write.")
    else:
        error = BakehouseError(f"{m.name}: the store could not be changed at {where} ({exc.strerror}). Check that path, then re-run: nothing half-done was activated.")
    error.__cause__ = exc
    return error


def _read_only(store: Store, m: LockedModel) -> Outcome:
    """A store this process cannot write (a read-only mount): up to date when it already verifies, else what is wrong."""
    outcome = verify_one(store, m, full=False)
    if outcome.ok:
        return Outcome(model=m.name, status="up-to-date", commit=m.commit, path=str(store.current_link(m.name)), files=len(m.files),
                       seconds=outcome.seconds, warnings=outcome.warnings)
    why = "; ".join(outcome.problems) or str(outcome.error)
    return Outcome.failed(m.name, ConfigError(f"{m.name}: the store at {store.root} is read-only and does not hold a verified copy ({why}). "
                                              "Fetch into a writable store (--dest, MODELS_DIR), or mount one that holds the model."), commit=m.commit)


def _already_there(store: Store, m: LockedModel) -> Outcome | None:
    """Up to date, or verified but not current: no network at all. A damaged copy is reclaimed for repair."""
    directory = store.commit_dir(m.name, m.commit)
    if not directory.is_dir():
        return None
    result = verify(directory, m, full=False)
    if not result.ok:
        log.warning("%s: %s is damaged (%s); repairing from the source", m.name, directory, "; ".join(p.message for p in result.problems))
        store.reclaim(m.name, m.commit)
        staging = store.staging_dir(m.name, m.commit)
        for path in [*(p.path for p in result.problems), STAMP_NAME]:
            store.remove(staging / path)
        return None
    status: Status = "up-to-date"
    if store.current_commit(m.name) != m.commit:
        store.activate(m.name, m.commit)
        status = "activated"
    return Outcome(model=m.name, status=status, commit=m.commit, path=str(store.current_link(m.name)), files=len(m.files), seconds=result.seconds, warnings=list(result.warnings))


def _missing(store: Store, m: LockedModel) -> list[LockedFile]:
    staging = store.staging_dir(m.name, m.commit)
    return [f for f in m.files if not ((staging / f.path).is_file() and (staging / f.path).stat().st_size == f.size)]


def bytes_needed(store: Store, m: LockedModel) -> int:
    partial = store.partial_dir(m.name, m.commit)
    need = 0
    for f in _missing(store, m):
        p = partial / f.path
        need += f.size - (p.stat().st_size if p.is_file() and p.stat().st_size <= f.size else 0)
    return need


def preflight(store: Store, models: Sequence[LockedModel]) -> None:
    """Refuse before the first byte when the lock's sizes do not fit (the 500 MB disk of the second seed)."""
    need = sum(bytes_needed(store, m) for m in models)
    have = shutil.disk_usage(store.root).free
    if need > have:
        names = ", ".join(m.name for m in models)
        raise DiskSpaceError(
            f"not enough disk space for {names}: need {format_bytes(need)}, have {format_bytes(have)} at {store.root}. "
            f"Free {format_bytes(need - have)} or more, or pass --dest DIR (MODELS_DIR) on a larger disk.",
            need=need, have=have, path=str(store.root),
        )


def _take_files(store: Store, m: LockedModel, needed: list[LockedFile], job: FetchJob, peers: Peers) -> tuple[list[str], list[str]]:
    """Every needed file into staging (from peers first, then the source), then the whole staging checked against the lock; the notes and warnings."""
    try:
        known, left, notes = fetch_from_peers(m, needed, job, peers.urls, peers.token, peers.stripes) if peers.urls and needed else ({}, needed, [])
        for note in notes:
            log.warning("%s: %s", m.name, note)
        if left:
            known |= source_for(m.source).fetch(m, left, job)
    finally:
        job.cancel.set()
        job.progress.close()
    result = verify(job.staging, m, full=True, known=known, workers=job.workers)
    if not result.ok:
        for p in result.problems:
            store.remove(job.staging / p.path)
        raise VerificationError(f"{m.name}: files in staging do not match models.lock, nothing was activated: " + "; ".join(p.message for p in result.problems))
    return notes, list(result.warnings)


def _fetch_one(store: Store, m: LockedModel, *, workers: int, tty: bool | None, peers: Peers) -> Outcome:
    start = time.monotonic()
    with store.locked(m.name):
        ready = _already_there(store, m)
        if ready:
            return ready
        staging, partial = store.staging_dir(m.name, m.commit), store.partial_dir(m.name, m.commit)
        safefs.makedirs(store.root, staging)
        safefs.makedirs(store.root, partial)
        needed = _missing(store, m)
        total = sum(f.size for f in needed)
        log.info("%s: fetching %d of %d files (%s) from %s", m.name, len(needed), len(m.files), format_bytes(total), m.source)
        progress = Progress(f"fetch {m.name}", total, tty=tty)
        job = FetchJob(root=store.root, staging=staging, partial=partial, progress=progress, workers=workers, ranges=store.ranges_dir(m.name, m.commit),
                       budget=Budget.for_fetch())
        if peers.share:
            job.on_verified = lambda path, at: store.share(m.name, m.commit, path, at)
            job.on_pieces = lambda path, have: store.share_pieces(m.name, m.commit, path, have)
        try:
            notes, warnings = _take_files(store, m, needed, job, peers)
            store.promote(m.name, m.commit)
            store.activate(m.name, m.commit)
        except BaseException:
            store.clean_ready(m.name, m.commit)  # this host's peers learn at once that it will not have the files
            raise
        # The ready links stay until this host's peer server exits (or the next fetch): a peer may be reading one right now.
        store.clean_partial(m.name, m.commit)
    seconds = time.monotonic() - start
    log.info("%s: %s in %.1fs (%s), verified and active at %s", m.name, format_bytes(total), seconds, format_rate(total, seconds), store.current_link(m.name))
    return Outcome(model=m.name, status="downloaded", commit=m.commit, path=str(store.current_link(m.name)), files=len(m.files), bytes=total, seconds=seconds,
                   warnings=[*notes, *warnings])
