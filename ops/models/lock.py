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

from ops.errors import LockError, StaleLockError, UnsafePathError
from ops.models.manifest import Manifest, spec_fingerprint

LOCK_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEADER = "# models.lock: written by `invoke lock-models`; commit it, do not edit it.\n"


@dataclass(frozen=True)
class LockedFile:
    path: str
    size: int
    sha256: str


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
    spec = manifest.models.get(model.name)
    if spec is None or spec_fingerprint(spec) != model.spec:
        raise StaleLockError(
            f"models.lock entry {model.name!r} was resolved from a different models.toml entry "
            f"(source, revision, include or exclude changed). Run `invoke lock-models --models {model.name}` and commit models.lock."
        )


def safe_relpath(path: str) -> str:
    """Reject file paths that could escape a model directory, whatever listed them."""
    pure = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or "\0" in path
        or pure.is_absolute()
        or any(part in ("..", ".", "") for part in path.split("/"))
        or pure.name == ".verified"
    ):
        raise UnsafePathError(
            f"refusing file path {path!r}: it is absolute, empty, reserved or contains '..'; "
            "a model's files must stay inside its directory. Check the source repository."
        )
    return path


def load_lock(path: Path) -> Lock:
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise LockError(
            f"{path}: not found. Run `invoke lock-models` (or `python -m ops.models lock`), "
            "or pass --lock FILE (or set BAKEHOUSE_LOCK)."
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"{path}: invalid TOML: {exc}. Regenerate it with `invoke lock-models`.") from exc
    return parse_lock(data, path)


def parse_lock(data: dict[str, Any], path: Path) -> Lock:
    if data.get("version") != LOCK_VERSION:
        raise LockError(f"{path}: lock format version {data.get('version')!r} is not {LOCK_VERSION}. Regenerate it with `invoke lock-models`.")
    try:
        models = {name: _parse_model(name, entry) for name, entry in data.get("models", {}).items()}
        default = tuple(data.get("default", ()))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, UnsafePathError):
            raise UnsafePathError(f"{path}: {exc}") from exc
        raise LockError(f"{path}: malformed entry ({exc!r}). Regenerate it with `invoke lock-models`.") from exc
    return Lock(path=path, models=models, default=default)


def _parse_model(name: str, entry: dict[str, Any]) -> LockedModel:
    files = tuple(_parse_file(f) for f in entry["files"])
    if len({f.path for f in files}) != len(files):
        raise ValueError(f"model {name!r} lists a file twice")
    return LockedModel(
        name=name,
        source=str(entry["source"]),
        revision=entry.get("revision"),
        commit=str(entry["commit"]),
        spec=str(entry["spec"]),
        files=files,
        allow_pickle=bool(entry.get("allow_pickle", False)),
    )


def _parse_file(entry: dict[str, Any]) -> LockedFile:
    size, sha = entry["size"], entry["sha256"]
    if not isinstance(size, int) or size < 0 or not isinstance(sha, str) or not _SHA256.match(sha):
        raise ValueError(f"bad size or sha256 for {entry.get('path')!r}")
    return LockedFile(path=safe_relpath(str(entry["path"])), size=size, sha256=sha)


def dump_lock(lock: Lock) -> str:
    data: dict[str, Any] = {"version": LOCK_VERSION, "default": list(lock.default), "models": {}}
    for name in sorted(lock.models):
        m = lock.models[name]
        entry: dict[str, Any] = {"source": m.source, "commit": m.commit, "spec": m.spec}
        if m.revision:
            entry["revision"] = m.revision
        if m.allow_pickle:
            entry["allow_pickle"] = True
        entry["files"] = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in m.files]
        data["models"][name] = entry
    return _HEADER + tomli_w.dumps(data)


def write_lock(lock: Lock) -> None:
    """Write atomically so an interrupted lock-models never leaves half a lock."""
    tmp = lock.path.with_name(f".{lock.path.name}.{os.getpid()}.tmp")
    tmp.write_text(dump_lock(lock))
    os.replace(tmp, lock.path)
