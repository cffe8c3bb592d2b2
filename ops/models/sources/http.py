"""A single file at an https:// URL, pinned by the sha256 given in models.toml."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from huggingface_hub.utils import get_session, hf_raise_for_status

from ops.errors import SourceError, redact
from ops.models.lock import LockedFile, LockedModel, safe_relpath
from ops.models.manifest import ModelSpec, spec_fingerprint
from ops.models.sources.base import FetchJob
from ops.models.sources.transfer import Download, download_all, translate_http_errors


def filename_of(url: str) -> str:
    """The file's name in the store: the last segment of the URL path."""
    return safe_relpath(posixpath.basename(unquote(urlsplit(url).path)))


@dataclass(frozen=True)
class HttpSource:
    url: str

    def resolve(self, spec: ModelSpec) -> LockedModel:
        with translate_http_errors(self.url):
            response = get_session().head(self.url, follow_redirects=True)
            hf_raise_for_status(response)
        length = response.headers.get("content-length")
        if length is None:
            raise SourceError(f"{redact(self.url)}: the server gives no Content-Length, so the lock cannot pin a size. Serve the file with its length.")
        sha256 = str(spec.sha256)  # the manifest requires it for https sources
        file = LockedFile(path=filename_of(self.url), size=int(length), sha256=sha256)
        return LockedModel(name=spec.name, source=spec.source, revision=None, commit=sha256, spec=spec_fingerprint(spec), files=(file,), allow_pickle=spec.allow_pickle)

    def fetch(self, model: LockedModel, files: Sequence[LockedFile], job: FetchJob) -> dict[str, str]:
        return download_all([Download(self.url, {}, f) for f in files], job, source=redact(self.url))
