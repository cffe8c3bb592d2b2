"""The store layout, identical on a laptop, in an image and on a bare host.

    $MODELS_DIR/<name>/<commit>/...files    immutable once verified
    $MODELS_DIR/<name>/<commit>/.verified   stamp
    $MODELS_DIR/<name>/current -> <commit>  switched atomically (the only symlink bakehouse makes)
    $MODELS_DIR/.staging/<name>.lock        one writer per model; its holder is written inside
    $MODELS_DIR/.staging/<name>/<commit>/   complete files awaiting activation
    $MODELS_DIR/.staging/<name>/<commit>.partial/  bytes still arriving
    $MODELS_DIR/.staging/<name>/<commit>.ready/    fetch --share: hard links to the staging files whose
                                                   bytes already matched the lock (a peer may serve them)
    $MODELS_DIR/.staging/<name>/<commit>.pieces/   fetch --share, a lock with pieces: per file in flight, which of
                                                   its pieces matched the lock ('0'/'1' a piece; a peer may serve those)

Names and commits come validated from models.lock, so every path here stays
below the root; every write goes through `safefs`, so none follows a link.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ops.errors import ConfigError, PlantedLinkError
from ops.models import safefs
from ops.models.values import GIT_COMMIT, SHA256
from ops.settings import progress_seconds

STAGING = ".staging"
CURRENT = "current"
log = logging.getLogger("bakehouse.store")


@dataclass(frozen=True)
class Store:
    root: Path

    def commit_dir(self, name: str, commit: str) -> Path:
        return self.root / name / commit

    def current_link(self, name: str) -> Path:
        return self.root / name / CURRENT

    def current_commit(self, name: str) -> str | None:
        """The commit `current` points at; None when there is none, or it points anywhere but a commit directory beside it."""
        try:
            target = os.readlink(self.current_link(name))
        except OSError:
            return None
        return target if GIT_COMMIT.match(target) or SHA256.match(target) else None

    def staging_dir(self, name: str, commit: str) -> Path:
        return self.root / STAGING / name / commit

    def partial_dir(self, name: str, commit: str) -> Path:
        return self.root / STAGING / name / f"{commit}.partial"

    def ready_dir(self, name: str, commit: str) -> Path:
        return self.root / STAGING / name / f"{commit}.ready"

    def share(self, name: str, commit: str, path: str, source: Path) -> None:
        """Offer one verified file (`source`: where this fetch holds it) to peers before the model is activated: a hard link under the ready directory."""
        target = self.ready_dir(name, commit) / path
        safefs.makedirs(self.root, target.parent)
        safefs.check_no_link(self.root, source)
        safefs.remove(self.root, target)
        os.link(source, target, follow_symlinks=False)

    def pieces_dir(self, name: str, commit: str) -> Path:
        return self.root / STAGING / name / f"{commit}.pieces"

    def share_pieces(self, name: str, commit: str, path: str, have: str) -> None:
        """Offer the pieces of a file still arriving that matched the lock ('1' in `have`) to peers."""
        from ops.models.pieces import write_have

        write_have(self.root, self.pieces_dir(name, commit) / path, have)

    def clean_ready(self, name: str, commit: str) -> None:
        safefs.remove(self.root, self.ready_dir(name, commit))
        safefs.remove(self.root, self.pieces_dir(name, commit))

    def lock_file(self, name: str) -> Path:
        return self.root / STAGING / f"{name}.lock"

    def writable(self) -> bool:
        """Whether this process can write the store (or create it, when it does not exist yet: its nearest existing parent decides)."""
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return os.access(probe, os.W_OK)

    def ensure_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            safefs.makedirs(self.root, self.root / STAGING)
        except OSError as exc:
            raise ConfigError(f"cannot create the model store at {self.root}: {exc.strerror}. Pass --dest DIR or set MODELS_DIR to a writable directory.") from exc

    def planted_links(self, name: str) -> list[Path]:
        """Symlinks where this model's files, staging and lock live, other than `current`: none of them is bakehouse's."""
        found = [p for p in (self.root / STAGING, self.lock_file(name)) if p.is_symlink()]
        found += safefs.links_under(self.root / STAGING / name)
        found += safefs.links_under(self.root / name, skip=(CURRENT,))
        current = self.current_link(name)
        if current.exists() and not current.is_symlink():
            raise ConfigError(f"{current}: a real file or directory where the store keeps its `current` link. Move it out of the store and re-run.")
        return found

    def check_links(self, name: str) -> None:
        links = self.planted_links(name)
        if links:
            raise PlantedLinkError.at(*links)

    @contextlib.contextmanager
    def locked(self, name: str, purpose: str = "fetch") -> Iterator[None]:
        """One writer per model at a time; a second one waits, saying every few seconds whose turn it is."""
        fd = safefs.open_file(self.root, self.lock_file(name), os.O_RDWR | os.O_CREAT)
        try:
            self._acquire(fd, fcntl.LOCK_EX, name)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')} ({purpose})\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def reading(self, name: str) -> Iterator[None]:
        """Wait while a fetch of this model holds its lock; works on read-only stores (no lock file, no wait)."""
        try:
            fd = os.open(self.lock_file(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PlantedLinkError.at(self.lock_file(name)) from exc
            yield
            return
        try:
            self._acquire(fd, fcntl.LOCK_SH, name)
            yield
        finally:
            os.close(fd)

    def _acquire(self, fd: int, mode: int, name: str) -> None:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        every, last = progress_seconds(), 0.0
        while True:
            if time.monotonic() - last >= every:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
                log.info("%s: waiting for %s, which holds %s", name, holder, self.lock_file(name))
                last = time.monotonic()
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.1)

    def promote(self, name: str, commit: str) -> Path:
        """Move a verified staging directory into place (a rename on one filesystem)."""
        target = self.commit_dir(name, commit)
        safefs.makedirs(self.root, target.parent)
        if os.path.lexists(target):
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
        """Turn a damaged commit directory back into staging so its good files are reused."""
        source, staging = self.commit_dir(name, commit), self.staging_dir(name, commit)
        safefs.makedirs(self.root, staging.parent)
        if os.path.lexists(staging):
            self.discard(source)
        else:
            os.rename(source, staging)

    def discard(self, path: Path) -> None:
        """Move aside into .staging, then delete, so a crash never leaves a half-deleted tree in place."""
        safefs.check_no_link(self.root, path)
        trash = self.root / STAGING / f"trash-{os.getpid()}-{path.name}"
        os.rename(path, trash)
        safefs.remove(self.root, trash)

    def remove(self, path: Path) -> None:
        safefs.remove(self.root, path)

    def ranges_dir(self, name: str, commit: str) -> Path:
        """Which chunks of each file in flight a ranged download has written (ops.models.sources.ranged): resumed after a crash."""
        return self.root / STAGING / name / f"{commit}.ranges"

    def clean_partial(self, name: str, commit: str) -> None:
        safefs.remove(self.root, self.partial_dir(name, commit))
        safefs.remove(self.root, self.ranges_dir(name, commit))
        safefs.remove(self.root, self.pieces_dir(name, commit))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
