"""The store layout, identical on a laptop, in an image and on a bare host.

    $MODELS_DIR/<name>/<commit>/...files    immutable once verified
    $MODELS_DIR/<name>/<commit>/.verified   stamp
    $MODELS_DIR/<name>/current -> <commit>  switched atomically
    $MODELS_DIR/.staging/<name>/<commit>/   complete files awaiting activation
    $MODELS_DIR/.staging/<name>/<commit>.partial/  bytes still arriving
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ops.errors import ConfigError

STAGING = ".staging"
CURRENT = "current"


@dataclass(frozen=True)
class Store:
    root: Path

    def commit_dir(self, name: str, commit: str) -> Path:
        return self.root / name / commit

    def current_link(self, name: str) -> Path:
        return self.root / name / CURRENT

    def current_commit(self, name: str) -> str | None:
        try:
            return os.readlink(self.current_link(name))
        except OSError:
            return None

    def staging_dir(self, name: str, commit: str) -> Path:
        return self.root / STAGING / name / commit

    def partial_dir(self, name: str, commit: str) -> Path:
        return self.root / STAGING / name / f"{commit}.partial"

    def writable(self) -> bool:
        """Whether this process can write the store (or create it, when it does not exist yet)."""
        probe = self.root if self.root.exists() else self.root.parent
        return os.access(probe, os.W_OK)

    def ensure_root(self) -> None:
        try:
            (self.root / STAGING).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the model store at {self.root}: {exc.strerror}. Pass --dest DIR or set MODELS_DIR to a writable directory.") from exc

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """One writer per model at a time; a second fetch waits instead of interleaving."""
        lock_path = self.root / STAGING / f"{name}.lock"
        with open(lock_path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def reading(self, name: str) -> Iterator[None]:
        """Wait while a fetch of this model holds its lock; works on read-only stores (no lock file, no wait)."""
        try:
            fh = open(self.root / STAGING / f"{name}.lock")
        except OSError:
            yield
            return
        with fh:
            fcntl.flock(fh, fcntl.LOCK_SH)
            yield

    def promote(self, name: str, commit: str) -> Path:
        """Move a verified staging directory into place (a rename on one filesystem)."""
        target = self.commit_dir(name, commit)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            self.discard(target)
        os.rename(self.staging_dir(name, commit), target)
        _fsync_dir(target.parent)
        return target

    def activate(self, name: str, commit: str) -> None:
        """Point `current` at `commit` with one rename, so readers see old or new, never neither."""
        link = self.current_link(name)
        tmp = link.with_name(f".{CURRENT}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(commit, tmp)
        os.replace(tmp, link)
        _fsync_dir(link.parent)

    def reclaim(self, name: str, commit: str) -> None:
        """Turn a failed commit directory back into staging so its good files are reused."""
        source, staging = self.commit_dir(name, commit), self.staging_dir(name, commit)
        staging.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            self.discard(source)
        else:
            os.rename(source, staging)

    def discard(self, path: Path) -> None:
        """Move aside, then delete, so a crash never leaves a half-deleted tree in place."""
        trash = self.root / STAGING / f"trash-{os.getpid()}-{path.name}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_partial(self, name: str, commit: str) -> None:
        shutil.rmtree(self.partial_dir(name, commit), ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
