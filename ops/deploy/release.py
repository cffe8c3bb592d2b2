"""A release for bare hosts, built on this machine: the project's wheel plus a wheelhouse of the app's dependencies.

The dependencies (torch, transformers, …) are pinned to the versions installed
here, the ones the tests ran against, and keyed by a digest of their wheels: a
host installs them once per digest into a shared venv, so a code-only release
uploads one small wheel. The hosts must match this machine's OS, CPU
architecture and Python minor version (or set `app_deps: system` and provide
the dependencies themselves).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ops.errors import ConfigError
from ops.images.actions import git_revision
from ops.remote.wheelhouse import ROOT, Wheelhouse, build_wheelhouse, exclusive, wheelhouse_of
from ops.runner import run

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


@dataclass(frozen=True)
class Release:
    version: str
    wheel: Path  # this project
    deps: Wheelhouse  # the app's dependencies, no project wheel
    manifest: Path
    lock: Path


def release_version(project: Path, tag: str | None) -> str:
    version = tag or git_revision(project)
    if not _VERSION.match(version):
        raise ConfigError(f"release version {version!r}: use letters, digits, '.', '_' and '-' (pass --tag).")
    return version


def app_requirements(project: Path) -> list[str]:
    """The base and `app` requirements from pyproject.toml, each pinned to the version installed here."""
    spec = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    pinned = []
    for req in [*spec["dependencies"], *spec["optional-dependencies"]["app"]]:
        name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError as exc:
            raise ConfigError(f"{name} is not installed here; run scripts/setup.sh (deploy ships the versions the tests ran with).") from exc
    return sorted(pinned)


def build_deps(project: Path, cache: Path | None = None) -> Wheelhouse:
    """Wheels of the app's dependencies, built once per set of pinned requirements and cached."""
    reqs = app_requirements(project)
    key = hashlib.sha256("\n".join([*reqs, sys.platform, sys.version.split()[0]]).encode()).hexdigest()[:16]
    dest = (cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bakehouse" / "app-wheelhouse") / key
    dest.mkdir(parents=True, exist_ok=True)
    with exclusive(dest / ".lock"):
        if not (dest / ".complete").exists():
            run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), *reqs])
            (dest / ".complete").touch()
        return wheelhouse_of(dest)


def build_release(project: Path = ROOT, *, tag: str | None = None, manifest: Path | None = None, lock: Path | None = None) -> Release:
    project = project.resolve()
    version = release_version(project, tag)  # a bad --tag stops here, before any wheel is built
    manifest, lock = manifest or project / "models.toml", lock or project / "models.lock"
    for path in (manifest, lock):
        if not path.exists():
            raise ConfigError(f"{path}: not found; a release ships the models.toml and models.lock it serves from (run invoke lock-models).")
    light = build_wheelhouse(project, project / "build" / "wheelhouse")
    [wheel] = [light.directory / w for w in light.wheels if w.startswith("bakehouse-")]
    return Release(version, wheel, build_deps(project), manifest, lock)
