"""Wheelhouses: folders of wheels built here and installed offline on hosts, identified by a digest of their contents.

The fleet's wheelhouse is this project and its light dependencies (no torch):
what a host needs to fetch and verify. Deploy's release adds a second one for
the app's dependencies (ops.deploy.release).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ops.runner import run

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path
    wheels: tuple[str, ...]
    digest: str


def build_wheelhouse(project: Path = ROOT, dest: Path | None = None) -> Wheelhouse:
    """This project's wheel and its light dependencies (no torch), rebuilt only when the sources change."""
    dest = dest or project / "build" / "wheelhouse"
    dest.mkdir(parents=True, exist_ok=True)
    with exclusive(dest / ".lock"):  # two commands building at once must not remove each other's wheels
        stamp, sources = dest / ".sources", source_digest(project)
        if not (stamp.exists() and stamp.read_text() == sources):
            for old in dest.glob("bakehouse-*.whl"):
                old.unlink()
            run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(project)])
            stamp.write_text(sources)
        return wheelhouse_of(dest)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """A lock file held for the block (released with the process, whatever happens)."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def wheelhouse_of(directory: Path) -> Wheelhouse:
    """The wheels in a directory and a digest of their contents: equal digests, nothing to reinstall."""
    wheels = tuple(sorted(p.name for p in directory.glob("*.whl")))
    digest = hashlib.sha256()
    for name in wheels:
        digest.update(name.encode() + wheel_identity(directory / name))
    return Wheelhouse(directory, wheels, digest.hexdigest()[:16])


def source_digest(project: Path) -> str:
    """What the project wheel is built from; the wheelhouse is rebuilt only when it changes."""
    digest = hashlib.sha256()
    for path in sorted([project / "pyproject.toml", project / "README.md", *project.glob("ops/**/*.py"), *project.glob("ops/**/*.yml"), *project.glob("app/**/*.py")]):
        digest.update(str(path.relative_to(project)).encode() + path.read_bytes())
    return digest.hexdigest()


def wheel_identity(path: Path) -> bytes:
    """The wheel's RECORD (a hash of every file in it): equal for equal contents, unlike the zip's own bytes."""
    with zipfile.ZipFile(path) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        return hashlib.sha256(z.read(record)).digest()
