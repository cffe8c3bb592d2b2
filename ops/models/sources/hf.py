"""hf://ORG/REPO through huggingface_hub, honouring HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, cast

from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, filter_repo_objects

from ops.errors import OfflineError, SourceError
from ops.models.lock import LockedFile, LockedModel, safe_relpath
from ops.models.manifest import ModelSpec, spec_fingerprint
from ops.models.sources.base import FetchJob, check_selection
from ops.models.sources.transfer import Download, HashingWriter, download_all, translate_http_errors
from ops.models.values import GIT_COMMIT

_TRUE = {"1", "ON", "YES", "TRUE"}


def endpoint() -> str:
    """Read at call time, so a changed HF_ENDPOINT is honoured without re-importing the hub client."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _hf_match(path: str, glob: str) -> bool:
    """The hub client's own glob rules (a pattern ending in '/' is a folder), one pattern at a time."""
    return bool(list(filter_repo_objects([path], allow_patterns=[glob])))


@dataclass(frozen=True)
class HfSource:
    repo_id: str

    @property
    def label(self) -> str:
        return f"hf://{self.repo_id} at {endpoint()}"

    def _check_online(self) -> None:
        if offline():
            raise OfflineError(
                f"hf://{self.repo_id}: HF_HUB_OFFLINE is set, so the hub cannot be asked. "
                "Unset HF_HUB_OFFLINE to download, or fetch on a machine with access and ship the store."
            )

    def resolve(self, spec: ModelSpec) -> LockedModel:
        self._check_online()
        api = HfApi(endpoint=endpoint(), token=_token())
        with translate_http_errors(self.label):
            commit = api.model_info(self.repo_id, revision=spec.revision).sha or ""
            if not GIT_COMMIT.match(commit):
                raise SourceError(f"{self.label}: the hub answered {commit[:80]!r} for revision {spec.revision!r}, not a commit id. Check HF_ENDPOINT.")
            tree = [e for e in api.list_repo_tree(self.repo_id, revision=commit, recursive=True) if isinstance(e, RepoFile)]
        selected = list(filter_repo_objects(tree, allow_patterns=list(spec.include) or None, ignore_patterns=list(spec.exclude) or None, key=lambda e: e.path))
        check_selection(spec, commit, [e.path for e in tree], [e.path for e in selected], _hf_match)
        small = [e for e in selected if e.lfs is None]
        with ThreadPoolExecutor(max_workers=8) as pool:
            hashed = dict(zip([e.path for e in small], pool.map(lambda e: self._hash_remote(e.path, commit), small), strict=True))
        files = tuple(
            LockedFile(path=safe_relpath(e.path), size=e.lfs.size, sha256=e.lfs.sha256) if e.lfs
            else LockedFile(path=safe_relpath(e.path), size=hashed[e.path][0], sha256=hashed[e.path][1])
            for e in selected
        )
        return LockedModel(name=spec.name, source=spec.source, revision=spec.revision, commit=commit, spec=spec_fingerprint(spec), files=files, allow_pickle=spec.allow_pickle)

    def _hash_remote(self, path: str, commit: str) -> tuple[int, str]:
        """Non-LFS files carry only a git blob id on the hub, so the lock hashes their bytes."""
        url = hf_hub_url(self.repo_id, path, revision=commit, endpoint=endpoint())
        with tempfile.TemporaryFile() as f, translate_http_errors(f"{self.label}: {path}"):
            writer = HashingWriter(f, lambda n: None, lambda: False)
            http_get(url, cast(BinaryIO, writer), headers=build_hf_headers(token=_token()), displayed_filename=path)
            return f.tell(), writer.hexdigest()

    def fetch(self, model: LockedModel, files: Sequence[LockedFile], job: FetchJob) -> dict[str, str]:
        self._check_online()
        headers = build_hf_headers(token=_token())
        downloads = [Download(hf_hub_url(self.repo_id, f.path, revision=model.commit, endpoint=endpoint()), headers, f) for f in files]
        return download_all(downloads, job, source=self.label)
