"""Compare what is on disk with the lock.

`diff` is pure: the lock against observations. `observe` does the I/O.
Full verify hashes every file; quick verify hashes only files whose stat no
longer matches the stamp, so it never passes a file modified after its full
verification.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ops.errors import ConfigError, PlantedLinkError, VerificationError
from ops.models.hashing import sha256_files
from ops.models.lock import LockedModel
from ops.models.report import Outcome
from ops.models.stamp import STAMP_NAME, FileStat, read_stamp, write_stamp
from ops.models.store import Store
from ops.units import format_bytes

LFS_SPEC = b"version https://git-lfs.github.com/spec/v1"
_POINTER_MAX = 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class LfsPointer:
    oid: str
    size: int


ObservedKind = Literal["file", "missing", "symlink", "other"]
ProblemKind = Literal["missing", "size", "sha256", "lfs-pointer", "symlink", "not-a-file"]


@dataclass(frozen=True)
class Observed:
    """One locked path as found on disk."""

    kind: ObservedKind
    size: int = 0
    sha256: str | None = None
    pointer: LfsPointer | None = None


@dataclass(frozen=True)
class Problem:
    path: str
    kind: ProblemKind
    message: str


@dataclass(frozen=True)
class VerifyResult:
    model: str
    commit: str
    directory: str
    mode: str
    problems: tuple[Problem, ...] = ()
    bytes_hashed: int = 0
    seconds: float = 0.0
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_lfs_pointer(head: bytes) -> LfsPointer | None:
    """A Git LFS pointer file's oid and size, or None if `head` is not one."""
    if not head.startswith(LFS_SPEC):
        return None
    fields = dict(line.split(" ", 1) for line in head.decode("utf-8", "replace").splitlines() if " " in line)
    oid = fields.get("oid", "").removeprefix("sha256:")
    try:
        return LfsPointer(oid=oid, size=int(fields.get("size", "")))
    except ValueError:
        return LfsPointer(oid=oid, size=-1)


def diff(model: LockedModel, observed: Mapping[str, Observed]) -> list[Problem]:
    problems = []
    for f in model.files:
        o = observed.get(f.path, Observed("missing"))
        problem = _compare(f.path, f.size, f.sha256, o, model.name)
        if problem:
            problems.append(problem)
    return problems


def _compare(path: str, size: int, sha256: str, o: Observed, name: str) -> Problem | None:
    if o.kind == "missing":
        return Problem(path, "missing", f"{path}: missing (expected {format_bytes(size)}). Run `invoke fetch-models --models {name}`.")
    if o.kind == "symlink":
        return Problem(path, "symlink", f"{path}: is a symlink or lies under one; the store holds real files only. Remove it and run `invoke fetch-models --models {name}`.")
    if o.kind != "file":
        return Problem(path, "not-a-file", f"{path}: is not a regular file. Remove it and run `invoke fetch-models --models {name}`.")
    if o.pointer is not None and o.size != size:
        return Problem(
            path,
            "lfs-pointer",
            f"{path}: is a Git LFS pointer file ({o.size} bytes) standing in for {format_bytes(o.pointer.size if o.pointer.size >= 0 else size)} "
            f"of weights: the LFS object was never downloaded. Run `git lfs pull` in that checkout, "
            f"or `invoke fetch-models --models {name}` to fetch the real file into the store.",
        )
    if o.size != size:
        return Problem(path, "size", f"{path}: size {o.size} bytes, expected {size} (truncated or replaced). Run `invoke fetch-models --models {name}` to repair.")
    if o.sha256 != sha256:
        return Problem(path, "sha256", f"{path}: sha256 {o.sha256}, expected {sha256} (corrupted or modified). Run `invoke fetch-models --models {name}` to repair.")
    return None


def observe(directory: Path, model: LockedModel, hash_paths: set[str], known: Mapping[str, str], *, workers: int | None = None,
            on_bytes: Callable[[int], None] | None = None) -> tuple[dict[str, Observed], int]:
    """Stat every locked file; hash those in `hash_paths`; reuse `known` hashes for the rest."""
    root = os.path.realpath(directory)
    kinds: dict[str, ObservedKind] = {}
    on_disk: dict[str, int] = {}  # the size of each locked path that is a regular file
    for f in model.files:
        kind, st = _classify(directory / f.path, root)
        kinds[f.path] = kind
        if kind == "file" and st is not None:
            on_disk[f.path] = st.st_size
    sizes = {f.path: f.size for f in model.files}
    to_hash = [p for p in hash_paths if on_disk.get(p) == sizes[p]]
    hashes = {str(path.relative_to(directory)): sha for path, sha in sha256_files([directory / p for p in to_hash], workers=workers, on_bytes=on_bytes).items()}
    observed = {}
    for path, kind in kinds.items():
        if path not in on_disk:
            observed[path] = Observed(kind)
            continue
        size = on_disk[path]
        pointer = _read_pointer(directory / path) if size < _POINTER_MAX and size != sizes[path] else None
        observed[path] = Observed("file", size, hashes.get(path, known.get(path)), pointer)
    return observed, sum(on_disk[p] for p in to_hash)


def _classify(path: Path, root: str) -> tuple[ObservedKind, os.stat_result | None]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing", None
    except NotADirectoryError:
        return "other", None
    if os.path.islink(path) or not os.path.realpath(path).startswith(root + os.sep):
        return "symlink", None
    if not os.path.isfile(path):
        return "other", None
    return "file", st


def _read_pointer(path: Path) -> LfsPointer | None:
    with open(path, "rb") as f:
        return parse_lfs_pointer(f.read(_POINTER_MAX))


def find_extra(directory: Path, model: LockedModel) -> list[str]:
    locked = {f.path for f in model.files}
    extra = []
    for dirpath, _dirnames, filenames in os.walk(directory):
        rel_dir = os.path.relpath(dirpath, directory)
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel not in locked and not (rel_dir == "." and name.startswith(STAMP_NAME)):
                extra.append(rel)
    return sorted(extra)


def verify(directory: Path, model: LockedModel, *, full: bool, workers: int | None = None, on_bytes: Callable[[int], None] | None = None,
           known: Mapping[str, str] | None = None) -> VerifyResult:
    """Verify `directory` against `model`; on success (re)write the stamp when the store is writable.

    `known` maps paths to hashes computed while the bytes were written (fetch);
    those files are not read again.
    """
    start = time.monotonic()
    trusted = {} if full else _trusted_hashes(directory, model)
    trusted.update(known or {})
    hash_paths = {f.path for f in model.files} - set(trusted)
    observed, nbytes = observe(directory, model, hash_paths, trusted, workers=workers, on_bytes=on_bytes)
    problems = diff(model, observed)
    warnings = []
    if not problems and (hash_paths or known is not None):
        warnings += _restamp(directory, model, observed)
    extra = find_extra(directory, model) if directory.is_dir() else []
    warnings += [f"{p}: extra file, not in models.lock (ignored; remove it if it should not be there)" for p in extra]
    return VerifyResult(
        model=model.name,
        commit=model.commit,
        directory=str(directory),
        mode="full" if full else "quick",
        problems=tuple(problems),
        bytes_hashed=nbytes,
        seconds=time.monotonic() - start,
        warnings=tuple(warnings),
    )


def _trusted_hashes(directory: Path, model: LockedModel) -> dict[str, str]:
    """Hashes from the stamp for files whose stat is unchanged since they were verified."""
    stamp = read_stamp(directory)
    if stamp is None or stamp.lock_digest != model.digest():
        return {}
    trusted = {}
    for f in model.files:
        entry = stamp.files.get(f.path)
        if entry is None or entry.sha256 != f.sha256:
            continue
        try:
            unchanged = FileStat.of(os.lstat(directory / f.path)) == entry.stat
        except OSError:
            unchanged = False
        if unchanged:
            trusted[f.path] = entry.sha256
    return trusted


def _restamp(directory: Path, model: LockedModel, observed: Mapping[str, Observed]) -> list[str]:
    try:
        write_stamp(directory, model.digest(), {p: o.sha256 for p, o in observed.items() if o.sha256})
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return [f"{directory} is read-only: verified, but the stamp was not updated (the next quick verify hashes again)"]
        raise
    return []


def verify_one(store: Store, m: LockedModel, *, full: bool, workers: int | None = None) -> Outcome:
    """Verify the locked commit of one model in the store, and that `current` points at it."""
    directory = store.commit_dir(m.name, m.commit)
    try:
        links = store.planted_links(m.name)
    except ConfigError as exc:
        return Outcome.failed(m.name, exc, commit=m.commit)
    if links:
        return Outcome.failed(m.name, PlantedLinkError.at(*links), commit=m.commit)
    current = store.current_commit(m.name)
    if not directory.is_dir():
        hint = f" (current points at {current[:12]})" if current else ""
        err = VerificationError(f"{m.name}: commit {m.commit[:12]} is not in the store at {store.root}{hint}. Run `invoke fetch-models --models {m.name}`.")
        return Outcome.failed(m.name, err, commit=m.commit)
    result = verify(directory, m, full=full, workers=workers)
    problems = [p.message for p in result.problems]
    if current != m.commit:
        problems.append(f"current points at {current or 'nothing'}, models.lock pins {m.commit[:12]}. Run `invoke fetch-models --models {m.name}` to activate it.")
    error = VerificationError(f"{m.name} does not match models.lock: " + "; ".join(problems), problems=problems) if problems else None
    return Outcome(
        model=m.name,
        status="failed" if problems else "verified (full)" if full else "verified (quick)",
        commit=m.commit,
        path=str(directory),
        files=len(m.files),
        bytes=result.bytes_hashed,
        seconds=result.seconds,
        warnings=list(result.warnings),
        error=error,
    )
