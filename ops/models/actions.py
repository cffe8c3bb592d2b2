"""The three model commands as functions: lock, fetch, verify. Both command lines (Invoke and `python -m ops.models`) call these."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ops import settings
from ops.errors import BakehouseError, ConfigError, VerificationError
from ops.models.fetch import Peers, fetch_locked
from ops.models.lock import Lock, LockedModel, load_lock, write_lock
from ops.models.manifest import Manifest, load_manifest
from ops.models.peer_server import PEER_TOKEN
from ops.models.pieces import hash_pieces, parse_piece_size
from ops.models.report import Outcome, Report, Status
from ops.models.sources import source_for
from ops.models.store import Store
from ops.models.verify import verify_one

ModelCommand = Literal["lock", "fetch", "verify"]
MODEL_COMMANDS: tuple[ModelCommand, ...] = ("lock", "fetch", "verify")


@dataclass(frozen=True)
class ModelRequest:
    """One model command and its options, as both command lines take them (defaults written here only)."""

    command: ModelCommand
    names: tuple[str, ...] = ()  # empty: models.toml's `default`; ("all",) for every model
    manifest: Path | None = None  # None: $BAKEHOUSE_MANIFEST, else ./models.toml
    lock: Path | None = None  # None: $BAKEHOUSE_LOCK, else ./models.lock
    dest: Path | None = None  # None: $MODELS_DIR, else ./models
    full: bool = False
    workers: int = 8
    peers: tuple[str, ...] = ()  # fetch: hosts to take verified files from first (http://addr:port)
    share: bool = False  # fetch: offer each verified file to this host's peers before activation
    stripes: int = 1  # fetch: files with pieces take piece k from the (k mod stripes)-th peer first
    pieces: int = 0  # lock: record each file's piece hashes, pieces of this many bytes (0: keep what the lock has)

    @classmethod
    def parse(cls, command: str, *, models: str | None = None, manifest: str | Path | None = None, lock: str | Path | None = None,
              dest: str | Path | None = None, full: bool = False, workers: object = None, peers: str | None = None, share: bool = False,
              pieces: str | None = None, stripes: object = None) -> ModelRequest:
        """From flag values as a command line gives them (strings or None)."""
        return cls(
            command=settings.choice("command", command, MODEL_COMMANDS),
            names=settings.names(models),
            manifest=Path(manifest) if manifest else None,
            lock=Path(lock) if lock else None,
            dest=Path(dest) if dest else None,
            full=full,
            workers=int(settings.number("--workers", workers, default=cls.workers, maximum=256)),
            peers=tuple(check_peer(url) for url in settings.names(peers)),
            share=share,
            pieces=parse_piece_size(pieces) if pieces else 0,
            stripes=int(settings.number("--stripes", stripes, default=cls.stripes, minimum=1, maximum=16)),
        )


_PEER = re.compile(r"^http://[A-Za-z0-9.:\[\]_-]+:[0-9]{1,5}\Z")


def check_peer(url: str) -> str:
    if not _PEER.match(url):
        raise ConfigError(f"--peers: {url!r} is not a peer address (http://HOST:PORT).")
    return url


def run(req: ModelRequest) -> Report:
    """Run one model command in this process."""
    settings.check_endpoint()
    manifest, lock, names = req.manifest or settings.default_manifest(), req.lock or settings.default_lock(), list(req.names) or None
    dest, explicit = req.dest or settings.default_models_dir(), req.manifest is not None or "BAKEHOUSE_MANIFEST" in os.environ
    if req.command == "lock":
        if req.pieces:
            settings.check_store_dir(dest, "--dest" if req.dest else "MODELS_DIR")
        return lock_models(manifest_path=manifest, lock_path=lock, names=names, piece_size=req.pieces, dest=dest)
    settings.check_store_dir(dest, "--dest" if req.dest else "MODELS_DIR")
    if req.command == "fetch":
        peers = Peers(req.peers, os.environ.get(PEER_TOKEN, ""), share=req.share, stripes=req.stripes)
        return fetch(manifest_path=manifest, lock_path=lock, names=names, dest=dest, workers=req.workers, manifest_explicit=explicit, peers=peers)
    return verify_models(manifest_path=manifest, lock_path=lock, names=names, dest=dest, workers=req.workers, manifest_explicit=explicit, full=req.full)


def _manifest_if_present(path: Path, explicit: bool) -> Manifest | None:
    """Fetch and verify need only the lock (a remote host or an image may carry no models.toml)."""
    if path.exists() or explicit:
        return load_manifest(path)
    return None


def lock_models(*, manifest_path: Path, lock_path: Path, names: list[str] | None, piece_size: int = 0, dest: Path | None = None) -> Report:
    """Resolve each model; with `piece_size`, also hash each file's pieces (the model is fetched, verified, into `dest` for that)."""
    start = time.monotonic()
    manifest = load_manifest(manifest_path)
    specs = manifest.select(names)
    previous = load_lock(lock_path) if lock_path.exists() else Lock(path=lock_path)
    report = Report("lock")
    resolved: dict[str, LockedModel] = {}
    for spec in specs:
        t0 = time.monotonic()
        try:
            locked = source_for(spec.source).resolve(spec)
            old = previous.models.get(spec.name)
            locked = _with_pieces(locked, old, piece_size, Store(dest or settings.default_models_dir())) if piece_size else _keep_pieces(locked, old)
        except BakehouseError as exc:
            report.outcomes.append(Outcome.failed(spec.name, exc))
            continue
        resolved[spec.name] = locked
        status: Status = "new" if old is None else ("unchanged" if old == locked else "updated")
        report.outcomes.append(Outcome(model=spec.name, status=status, commit=locked.commit, files=len(locked.files), bytes=locked.total_size, seconds=time.monotonic() - t0))
    kept = {n: m for n, m in previous.models.items() if n in manifest.models}
    write_lock(Lock(path=lock_path, models=kept | resolved, default=manifest.default))
    report.seconds = time.monotonic() - start
    return report


def _keep_pieces(locked: LockedModel, old: LockedModel | None) -> LockedModel:
    """Without --pieces: the pieces an earlier lock recorded for a file still hold while its sha256 is the same."""
    before = {(f.path, f.size, f.sha256): f for f in old.files} if old else {}
    files = tuple(before.get((f.path, f.size, f.sha256), f) for f in locked.files)
    return dataclasses.replace(locked, files=files)


def _with_pieces(locked: LockedModel, old: LockedModel | None, piece_size: int, store: Store) -> LockedModel:
    """Each file's piece hashes: kept from the lock when it has them at this size, else read from a verified copy fetched into the store."""
    kept = _keep_pieces(locked, old)
    if all(f.piece_size == piece_size or not f.size for f in kept.files):
        return kept
    outcome = fetch_locked([locked], store)[0]
    if outcome.error is not None:
        raise outcome.error
    directory = store.commit_dir(locked.name, locked.commit)
    files = []
    for f in locked.files:
        whole, hashes = hash_pieces(directory / f.path, piece_size) if f.size else (f.sha256, ())
        if whole != f.sha256:
            raise VerificationError(f"{locked.name}: {f.path} changed in the store while its pieces were hashed. Re-run `invoke lock-models --pieces`.")
        files.append(dataclasses.replace(f, piece_size=piece_size if hashes else 0, pieces=hashes))
    return dataclasses.replace(locked, files=tuple(files))


def fetch(*, manifest_path: Path, lock_path: Path, dest: Path, names: list[str] | None, workers: int = 8, manifest_explicit: bool = False,
          peers: Peers | None = None) -> Report:
    start = time.monotonic()
    models = load_lock(lock_path).select(names, _manifest_if_present(manifest_path, manifest_explicit))
    report = Report("fetch", fetch_locked(models, Store(dest), workers=workers, peers=peers or Peers()))
    report.seconds = time.monotonic() - start
    return report


def verify_models(*, manifest_path: Path, lock_path: Path, dest: Path, names: list[str] | None, full: bool, workers: int | None = None, manifest_explicit: bool = False) -> Report:
    start = time.monotonic()
    models = load_lock(lock_path).select(names, _manifest_if_present(manifest_path, manifest_explicit))
    store = Store(dest)
    report = Report("verify", [verify_one(store, m, full=full, workers=workers) for m in models])
    report.seconds = time.monotonic() - start
    return report
