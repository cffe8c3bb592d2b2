"""What every source provides, and the shared job a fetch hands to it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ops.errors import ManifestError
from ops.models.lock import LockedFile, LockedModel
from ops.models.manifest import ModelSpec
from ops.models.progress import Progress

if TYPE_CHECKING:
    from ops.models.sources.ranged import Budget


def check_selection(spec: ModelSpec, commit: str, paths: Sequence[str], selected: Sequence[str], matches: Callable[[str, str], bool]) -> None:
    """At lock time: every `include` glob matches a file of the commit, and the model has at least one file."""
    at = f"{spec.source} at {commit[:12]}"
    for glob in spec.include if spec.strict_include else ():
        if not any(matches(p, glob) for p in paths):
            raise ManifestError(f"models.{spec.name}.include: {glob!r} matches no file in {at}. Fix the glob (or the revision) in models.toml.")
    if not selected:
        raise ManifestError(f"models.{spec.name}: include/exclude leave no file of {at} to lock. Fix the globs in models.toml.")


@dataclass
class FetchJob:
    """Where a source writes: complete files under `staging`, bytes in flight under `partial`, both below the store `root`."""

    root: Path
    staging: Path
    partial: Path
    progress: Progress
    ranges: Path | None = None  # where ranged downloads record the chunks they wrote (None: no ranged downloads)
    budget: Budget | None = None  # range requests in flight and chunk buffers, shared by every file of the fetch
    workers: int = 8
    cancel: threading.Event = field(default_factory=threading.Event)
    # Called with a file's path in the model and where it is, once its bytes matched the lock (fetch --share offers it to peers).
    on_verified: Callable[[str, Path], None] = lambda path, at: None
    # For a lock with pieces: called with a file's path and which of its pieces matched the lock so far ('1' each, '0' the others).
    on_pieces: Callable[[str, str], None] = lambda path, have: None


class Source(Protocol):
    def resolve(self, spec: ModelSpec) -> LockedModel:
        """Pin the spec's revision to a commit and list every selected file's size and sha256."""

    def fetch(self, model: LockedModel, files: Sequence[LockedFile], job: FetchJob) -> dict[str, str]:
        """Write `files` into job.staging; return the sha256 of each file hashed while written."""
