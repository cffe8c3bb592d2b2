"""Where weights come from: the hub, git + git-lfs, or a single https file."""

from __future__ import annotations

from ops.models.sources.base import FetchJob, Source
from ops.models.sources.git import GitSource
from ops.models.sources.hf import HfSource
from ops.models.sources.http import HttpSource

__all__ = ["FetchJob", "Source", "source_for"]


def source_for(source: str) -> Source:
    """The Source for a `source = "…"` string from models.toml or models.lock."""
    if source.startswith("hf://"):
        return HfSource(repo_id=source.removeprefix("hf://"))
    if source.startswith("git+"):
        return GitSource(url=source.removeprefix("git+"))
    return HttpSource(url=source)
