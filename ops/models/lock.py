"""models.lock: the resolved commit and every file's size and sha256.

Fetch and verify trust the lock, never what a server says today.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import tomli_w

from ops.errors import LockError, StaleLockError, UnsafePathError, redact
from ops.models import pieces, values
from ops.models.manifest import Manifest, spec_fingerprint
from ops.settings import read_text

LOCK_VERSION = 1
_SPEC = re.compile(r"^[0-9a-f]{16}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEADER = "# models.lock: written by `invoke lock-models`; commit it, do not edit it.\n"


@dataclass(frozen=True)
class LockedFile:
    path: str
    size: int
    sha256: str
    piece_size: int = 0  # with `lock-models --pieces`: each piece's sha256 (ops.models.pieces); 0 and () without
    pieces: tuple[str, ...] = ()

    def piece_range(self, index: int) -> tuple[int, int]:
        """Piece `index`'s first byte and length."""
        start = index * self.piece_size
        return start, min(self.piece_size, self.size - start)


@dataclass(frozen=True)
class LockedModel:
    name: str
    source: str
    revision: str | None
    commit: str
    spec: str
    files: tuple[LockedFile, ...]
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        # One canonical order, so digests and "unchanged" comparisons ignore listing order.
        object.__setattr__(self, "files", tuple(sorted(self.files, key=lambda f: f.path)))

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def digest(self) -> str:
        """Identity of what the store must hold: source, commit and every file."""
        body = {"source": self.source, "commit": self.commit, "files": [[f.path, f.size, f.sha256] for f in self.files]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Lock:
    path: Path
    models: dict[str, LockedModel] = field(default_factory=dict)
    default: tuple[str, ...] = ()

    def select(self, names: list[str] | None, manifest: Manifest | None = None) -> list[LockedModel]:
        """Locked models for `names` (default: the manifest's, else the lock's default), checked fresh."""
        if names == ["all"]:
            names = list(self.models)
        wanted = names or list((manifest.default if manifest else self.default) or self.models)
        missing = [n for n in wanted if n not in self.models]
        if missing:
            raise LockError(
                f"{self.path}: no entry for {', '.join(map(repr, missing))}. "
                f"Run `invoke lock-models --models {','.join(missing)}` (or `python -m ops.models lock`) and commit models.lock."
            )
        selected = [self.models[n] for n in wanted]
        if manifest is not None:
            for model in selected:
                check_fresh(model, manifest)
        return selected


def check_fresh(model: LockedModel, manifest: Manifest) -> None:
    """The lock entry was resolved from this very models.toml entry: same fingerprint, source, revision (and sha256)."""
    spec = manifest.models.get(model.name)
    same = spec is not None and spec_fingerprint(spec) == model.spec and spec.source == model.source and spec.revision == model.revision
    if same and spec is not None and values.is_direct(spec.source):
        same = spec.sha256 == model.commit
    if not same:
        raise StaleLockError(
            f"models.lock entry {model.name!r} does not match its models.toml entry "
            f"(source, revision, include, exclude or sha256 differ). Run `invoke lock-models --models {model.name}` and commit models.lock."
        )


def safe_relpath(path: str) -> str:
    """Reject file paths that could escape a model directory, whatever listed them."""
    pure = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or _CONTROL.search(path)
        or pure.is_absolute()
        or any(part in ("..", ".", "") or len(part.encode()) > 255 for part in path.split("/"))
        or len(path) > 1024
        or pure.name.startswith(".verified")
    ):
        raise UnsafePathError(
            f"refusing file path {path!r}: it is absolute, empty, too long, reserved, has control characters or contains '..'; "
            "a model's files must stay inside its directory. Check the source repository."
        )
    return path


def load_lock(path: Path) -> Lock:
    """Parse and validate models.lock. Any bytes in: a Lock or a LockError out."""
    text = read_text(path, LockError, "models.lock", "Run `invoke lock-models` (or `python -m ops.models lock`), or pass --lock FILE (or set BAKEHOUSE_LOCK).")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"{path}: invalid TOML: {exc}. Regenerate it with `invoke lock-models`.") from exc
    return parse_lock(data, path)


def parse_lock(data: dict[str, Any], path: Path) -> Lock:
    if data.get("version") != LOCK_VERSION:
        raise LockError(f"{path}: lock format version {data.get('version')!r} is not {LOCK_VERSION}. Regenerate it with `invoke lock-models`.")
    tables = data.get("models", {})
    if not isinstance(tables, dict):
        raise LockError(f"{path}: 'models' must be a table of [models.NAME] entries, got {type(tables).__name__}. Regenerate it with `invoke lock-models`.")
    models = {name: _parse_model(name, entry, f"{path}: models.{name}") for name, entry in tables.items()}
    default = data.get("default", [])
    if not isinstance(default, list) or not all(isinstance(d, str) and d in models for d in default):
        raise LockError(f"{path}: 'default' must list model names that have an entry. Regenerate it with `invoke lock-models`.")
    return Lock(path=path, models=models, default=tuple(default))


def _bad(where: str, what: str) -> LockError:
    return LockError(f"{where}: {what}. models.lock is written by `invoke lock-models`: regenerate it rather than editing it.")


def _field(entry: dict[str, Any], key: str, kind: type, where: str, *, required: bool = True) -> Any:
    if key not in entry:
        if required:
            raise _bad(where, f"missing key {key!r}")
        return None
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise _bad(f"{where}.{key}", f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _parse_model(name: str, entry: Any, where: str) -> LockedModel:
    if (problem := values.name_problem(name)) is not None:
        raise _bad(where, f"the model name {problem}")
    if not isinstance(entry, dict):
        raise _bad(where, "must be a table")
    source = _field(entry, "source", str, where)
    if (problem := values.source_problem(source)) is not None:
        raise _bad(f"{where}.source", f"{redact(source)!r} {problem}")
    revision = _field(entry, "revision", str, where, required=False)
    if revision is not None and (problem := values.revision_problem(revision)) is not None:
        raise _bad(f"{where}.revision", f"{revision!r} {problem}")
    commit = _field(entry, "commit", str, where)
    if (problem := values.commit_problem(source, commit)) is not None:
        raise _bad(f"{where}.commit", f"{commit!r} {problem}")
    spec = _field(entry, "spec", str, where)
    if not _SPEC.match(spec):
        raise _bad(f"{where}.spec", f"{spec!r} is not a spec fingerprint (16 hex digits)")
    raw_files = _field(entry, "files", list, where)
    files = tuple(_parse_file(f, f"{where}.files[{i}]") for i, f in enumerate(raw_files))
    if not files:
        raise _bad(f"{where}.files", "lists no file; a model has at least one")
    if len({f.path for f in files}) != len(files):
        raise _bad(f"{where}.files", "lists a file twice")
    return LockedModel(name=name, source=source, revision=revision, commit=commit, spec=spec, files=files,
                       allow_pickle=bool(_field(entry, "allow_pickle", bool, where, required=False)))


def _parse_file(entry: Any, where: str) -> LockedFile:
    if not isinstance(entry, dict):
        raise _bad(where, "must be a table with path, size and sha256")
    path, size, sha = _field(entry, "path", str, where), _field(entry, "size", int, where), _field(entry, "sha256", str, where)
    if size < 0:
        raise _bad(f"{where}.size", f"{size} is negative")
    if not values.SHA256.match(sha):
        raise _bad(f"{where}.sha256", f"{sha!r} is not 64 lowercase hex digits")
    piece_size, piece_list = _parse_pieces(entry, size, where)
    try:
        return LockedFile(path=safe_relpath(path), size=size, sha256=sha, piece_size=piece_size, pieces=piece_list)
    except UnsafePathError as exc:
        raise UnsafePathError(f"{where}.path: {exc}") from exc


def _parse_pieces(entry: dict[str, Any], size: int, where: str) -> tuple[int, tuple[str, ...]]:
    """Both keys or neither; a piece size in range; exactly as many piece hashes as the size needs (the last piece may be short)."""
    piece_size = _field(entry, "piece_size", int, where, required=False)
    raw = _field(entry, "pieces", list, where, required=False)
    if piece_size is None and raw is None:
        return 0, ()
    if piece_size is None or raw is None:
        raise _bad(where, "has one of piece_size and pieces without the other")
    if not pieces.MIN_PIECE <= piece_size <= pieces.MAX_PIECE:
        raise _bad(f"{where}.piece_size", f"{piece_size} is not from {pieces.MIN_PIECE} to {pieces.MAX_PIECE}")
    if len(raw) != pieces.piece_count(size, piece_size):
        raise _bad(f"{where}.pieces", f"lists {len(raw)} pieces where {size} bytes in pieces of {piece_size} make {pieces.piece_count(size, piece_size)}")
    if not all(isinstance(h, str) and values.SHA256.match(h) for h in raw):
        raise _bad(f"{where}.pieces", "must list sha256s (64 lowercase hex digits)")
    return piece_size, tuple(raw)


def dump_lock(lock: Lock) -> str:
    data: dict[str, Any] = {"version": LOCK_VERSION, "default": list(lock.default), "models": {}}
    for name in sorted(lock.models):
        m = lock.models[name]
        entry: dict[str, Any] = {"source": m.source, "commit": m.commit, "spec": m.spec}
        if m.revision:
            entry["revision"] = m.revision
        if m.allow_pickle:
            entry["allow_pickle"] = True
        entry["files"] = [{"path": f.path, "size": f.size, "sha256": f.sha256} | ({"piece_size": f.piece_size, "pieces": list(f.pieces)} if f.pieces else {})
                          for f in m.files]
        data["models"][name] = entry
    return _HEADER + tomli_w.dumps(data)


def write_lock(lock: Lock) -> None:
    """Write atomically so an interrupted lock-models never leaves half a lock."""
    tmp = lock.path.with_name(f".{lock.path.name}.{os.getpid()}.tmp")
    tmp.write_text(dump_lock(lock))
    os.replace(tmp, lock.path)
