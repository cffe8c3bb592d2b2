"""models.toml: which models, from where, at which revision, which files."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops.errors import ManifestError, redact
from ops.models import values
from ops.settings import read_text

_KEYS = {"source", "revision", "include", "exclude", "bake", "sha256", "allow_pickle"}


@dataclass(frozen=True)
class ModelSpec:
    """One `[models.NAME]` table."""

    name: str
    source: str
    revision: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    bake: bool = False
    sha256: str | None = None
    allow_pickle: bool = False
    strict_include: bool = True  # every include glob must match a file (False: the entrypoint's optional small-file globs)

    @property
    def scheme(self) -> str:
        return values.scheme_of(self.source) or ""


@dataclass(frozen=True)
class Manifest:
    path: Path
    models: dict[str, ModelSpec]
    default: tuple[str, ...]

    def select(self, names: list[str] | None) -> list[ModelSpec]:
        """The models a command acts on: `names`, else the manifest's `default` list."""
        wanted = names or list(self.default) or list(self.models)
        if wanted == ["all"]:
            wanted = list(self.models)
        unknown = [n for n in wanted if n not in self.models]
        if unknown:
            raise ManifestError(
                f"{self.path}: no model named {', '.join(map(repr, unknown))}. "
                f"Known models: {', '.join(self.models) or 'none'}. Check --models or add a [models.NAME] table."
            )
        return [self.models[n] for n in wanted]


def load_manifest(path: Path) -> Manifest:
    """Parse and validate models.toml; errors name the line or the key. Any bytes in: a Manifest or a ManifestError out."""
    text = read_text(path, ManifestError, "models.toml", "Run from the project directory or pass --manifest FILE (or set BAKEHOUSE_MANIFEST).")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: invalid TOML: {exc}. Fix that line and re-run.") from exc
    return parse_manifest(data, path)


def parse_manifest(data: dict[str, Any], path: Path) -> Manifest:
    unknown_top = set(data) - {"models", "default"}
    if unknown_top:
        raise ManifestError(f"{path}: unknown top-level key {sorted(unknown_top)[0]!r}; expected 'default' and [models.NAME] tables.")
    tables = data.get("models")
    if not isinstance(tables, dict) or not tables:
        raise ManifestError(f"{path}: no [models.NAME] table. Declare at least one model (see README, 'models.toml').")
    models = {name: _parse_model(name, table, path) for name, table in tables.items()}
    default = data.get("default", [])
    if not isinstance(default, list) or not all(isinstance(d, str) for d in default):
        raise ManifestError(f"{path}: 'default' must be a list of model names, e.g. default = [\"demo\"].")
    missing = [d for d in default if d not in models]
    if missing:
        raise ManifestError(f"{path}: 'default' names {missing[0]!r}, which has no [models.{missing[0]}] table.")
    return Manifest(path=path, models=models, default=tuple(default))


def _parse_model(name: str, table: Any, path: Path) -> ModelSpec:
    where = f"{path}: models.{name}"
    if values.name_problem(name):
        raise ManifestError(f"{where}: model names may use letters, digits, '.', '_' and '-' only, starting with a letter or digit.")
    if not isinstance(table, dict):
        raise ManifestError(f"{where}: must be a table, e.g. [models.{name}].")
    unknown = set(table) - _KEYS
    if unknown:
        raise ManifestError(f"{where}.{sorted(unknown)[0]}: unknown key; valid keys are {', '.join(sorted(_KEYS))}.")
    source = _typed(table, "source", str, where, required=True)
    if problem := values.source_problem(source):
        raise ManifestError(f"{where}.source: {redact(source)!r} {problem}.")
    spec = ModelSpec(
        name=name,
        source=source,
        revision=_typed(table, "revision", str, where),
        include=tuple(_globs(table, "include", where)),
        exclude=tuple(_globs(table, "exclude", where)),
        bake=_typed(table, "bake", bool, where) or False,
        sha256=_typed(table, "sha256", str, where),
        allow_pickle=_typed(table, "allow_pickle", bool, where) or False,
    )
    _check_source_rules(spec, where)
    return spec


def _check_source_rules(spec: ModelSpec, where: str) -> None:
    direct = values.is_direct(spec.source)
    if direct and not (spec.sha256 and values.SHA256.match(spec.sha256)):
        raise ManifestError(f"{where}.sha256: https:// sources need the file's sha256 (64 lowercase hex digits); get it with `sha256sum FILE`.")
    if not direct and spec.sha256:
        raise ManifestError(f"{where}.sha256: only https:// sources take a sha256; hub and git sources are pinned by models.lock.")
    if not direct and not spec.revision:
        raise ManifestError(f"{where}.revision: required for {spec.scheme} sources (a branch, tag or commit, e.g. \"main\").")
    if direct and spec.revision:
        raise ManifestError(f"{where}.revision: https:// sources are pinned by their sha256; remove the revision.")
    if spec.revision and (problem := values.revision_problem(spec.revision)):
        raise ManifestError(f"{where}.revision: {spec.revision!r} {problem}.")


def _typed(table: dict[str, Any], key: str, kind: type, where: str, *, required: bool = False) -> Any:
    if key not in table:
        if required:
            raise ManifestError(f"{where}: missing required key {key!r}.")
        return None
    value = table[key]
    if not isinstance(value, kind) or (kind is str and not value):
        raise ManifestError(f"{where}.{key}: expected a {'non-empty string' if kind is str else kind.__name__}, got {value!r}.")
    return value


def _globs(table: dict[str, Any], key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and not values.glob_problem(v) for v in value):
        raise ManifestError(f"{where}.{key}: expected a list of glob strings, e.g. [\"*.safetensors\", \"*.json\"].")
    return value


def spec_fingerprint(spec: ModelSpec) -> str:
    """What the lock was resolved from; a different fingerprint means the lock is stale."""
    parts = [spec.source, spec.revision or "", *spec.include, "|", *spec.exclude, spec.sha256 or ""]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
