"""The rules a value read from models.toml or models.lock must follow, checked where it is parsed.

Each check returns what is wrong (a phrase to put after the key's name) or
None. Both files are input, like an HTTP body: a value that fails here never
reaches a path, a URL or an argv.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

SCHEMES = ("hf://", "git+https://", "git+http://", "git+file://", "https://", "http://")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
GIT_COMMIT = re.compile(r"^[0-9a-f]{40}\Z")
_HF_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?\Z")
_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What git's check-ref-format forbids anywhere in a ref name, plus a leading '-' (it would read as an option).
_BAD_REF = re.compile(r"(^-|\.\.|@\{|[\x00-\x20\x7f~^:?*\[\\]|/$|\.lock$|^/|//)")


def scheme_of(source: str) -> str | None:
    return next((s for s in SCHEMES if source.startswith(s)), None)


def is_direct(source: str) -> bool:
    """https:// and http:// sources: one file pinned by its sha256."""
    return scheme_of(source) in ("https://", "http://")


def name_problem(name: str) -> str | None:
    if NAME.match(name):
        return None
    return "use letters, digits, '.', '_' and '-' only (starting with a letter or digit, at most 128 characters)"


def source_problem(source: str) -> str | None:
    scheme = scheme_of(source)
    if scheme is None:
        return "has an unsupported scheme; use hf://ORG/REPO, git+https://…, git+file://… or https://…"
    if _SPACE_OR_CONTROL.search(source):
        return "must not contain spaces or control characters"
    if scheme == "hf://":
        parts = source.removeprefix("hf://").split("/")
        if len(parts) != 2 or not all(_HF_PART.match(p) and ".." not in p and "--" not in p for p in parts):
            return "must look like hf://ORG/REPO (letters, digits, '.', '_', '-'; no '..' or '--')"
        return None
    url = urlsplit(source.removeprefix("git+"))
    if url.username or url.password:
        return ("must not carry credentials (models.toml and models.lock are committed and copied to hosts): "
                "use HF_TOKEN, or a git credential helper for git remotes")
    if url.scheme == "file":
        return None if url.path.startswith("/") and not url.netloc else "a file:// URL needs an absolute path (git+file:///srv/repo.git)"
    if not url.hostname:
        return "needs a host (https://host/…)"
    if is_direct(source) and (not url.path or url.path.endswith("/")):
        return "must end with the file's name"
    return None


def revision_problem(revision: str) -> str | None:
    if _BAD_REF.search(revision) or len(revision) > 255:
        return "must be a branch, tag or commit: no leading '-', spaces, '..', '~', '^', ':' or other characters git refuses in a ref"
    return None


def commit_problem(source: str, commit: str) -> str | None:
    """The lock's commit, in the exact format of its source: a git commit id, or the file's sha256."""
    if is_direct(source):
        return None if SHA256.match(commit) else "must be the file's sha256 (64 lowercase hex digits)"
    return None if GIT_COMMIT.match(commit) else "must be a full commit id (40 lowercase hex digits)"


def glob_problem(glob: str) -> str | None:
    return "must be non-empty globs without control characters" if not glob or _CONTROL.search(glob) else None
