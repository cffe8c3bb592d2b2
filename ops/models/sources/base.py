"""What every source provides, and the shared job a fetch hands to it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ops.models.lock import LockedFile, LockedModel
from ops.models.manifest import ModelSpec
from ops.models.progress import Progress


class Cancelled(Exception):
    """Another worker failed or the user pressed Ctrl-C; stop at the next chunk."""


@dataclass
class FetchJob:
    """Where a source writes: complete files under `staging`, bytes in flight under `partial`."""

    staging: Path
    partial: Path
    progress: Progress
    workers: int = 8
    cancel: threading.Event = field(default_factory=threading.Event)


class Source(Protocol):
    def resolve(self, spec: ModelSpec) -> LockedModel:
        """Pin the spec's revision to a commit and list every selected file's size and sha256."""

    def fetch(self, model: LockedModel, files: Sequence[LockedFile], job: FetchJob) -> dict[str, str]:
        """Write `files` into job.staging; return the sha256 of each file hashed while written."""
