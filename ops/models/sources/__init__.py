"""Where weights come from: the hub, git + git-lfs, or a single https file."""

from __future__ import annotations

from ops.models.sources.base import FetchJob, Source

__all__ = ["FetchJob", "Source", "source_for"]


def source_for(source: str) -> Source:
    """The Source for a `source = "…"` string from models.toml or models.lock.

    Imported here, not above: the hub client takes about 0.4 s of a core to import, and most runs (a verify, a fetch
    from peers, a peer server, every host of a fleet) never call it.
    """
    if source.startswith("hf://"):
        from ops.models.sources.hf import HfSource

        return HfSource(repo_id=source.removeprefix("hf://"))
    if source.startswith("git+"):
        from ops.models.sources.git import GitSource

        return GitSource(url=source.removeprefix("git+"))
    from ops.models.sources.http import HttpSource

    return HttpSource(url=source)
