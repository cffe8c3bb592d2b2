"""git+https:// and git+file:// repositories through git and git-lfs (the first seed's source).

The lock pins the commit; LFS files are pinned by the oid (sha256) and size in
their pointer, other files by hashing their blob at lock time.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from ops.errors import Cancelled, CommandError, SourceAuthError, SourceError, SourceNotFoundError, SourceUnreachableError, UnsafePathError, redact
from ops.models import safefs
from ops.models.lock import LockedFile, LockedModel, safe_relpath
from ops.models.manifest import ModelSpec, spec_fingerprint
from ops.models.sources.base import FetchJob, check_selection
from ops.models.values import GIT_COMMIT
from ops.models.verify import parse_lfs_pointer
from ops.runner import run

# Never prompt for credentials (CI has no terminal) and never smudge: LFS objects come via `git lfs fetch`.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1"}
CREDENTIALS_ENV = "GIT_REPO_URL"  # the first seed's variable: the only place a git URL with user:password@ comes from


def without_credentials(url: str) -> str:
    """The URL without its user:password@ part: what a lock, a log line and git's argv may hold."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=netloc + (f":{parts.port}" if parts.port else "")))


def auth_env(url: str) -> dict[str, str]:
    """Credentials for `url`'s host from GIT_REPO_URL, as an HTTP header git and git-lfs send: in the environment of git only,
    never in its argv (`ps` shows that), a config file, or the lock."""
    given = os.environ.get(CREDENTIALS_ENV, "")
    try:
        have, want = urlsplit(given), urlsplit(url)
        same = have.password is not None and (have.scheme, have.hostname, have.port) == (want.scheme, want.hostname, want.port)
    except ValueError:
        return {}
    if not same:
        return {}
    token = base64.b64encode(f"{unquote(have.username or '')}:{unquote(have.password or '')}".encode()).decode()
    return {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader", "GIT_CONFIG_VALUE_0": f"Authorization: Basic {token}"}
_AUTH = re.compile(r"Authentication failed|could not read (Username|Password)|Access denied|returned error: 40[13]|Permission denied \(publickey", re.IGNORECASE)


@dataclass(frozen=True)
class TreeEntry:
    mode: str
    kind: str
    size: int
    path: str


def init_argv(repo: Path) -> list[str]:
    return ["git", "init", "--quiet", str(repo)]


def fetch_argv(repo: Path, url: str, ref: str) -> list[str]:
    """`--end-of-options`: a URL or ref from models.toml can never be read as an option (`--upload-pack=…`)."""
    return ["git", "-C", str(repo), "fetch", "--quiet", "--depth", "1", "--no-tags", "--end-of-options", url, ref]


def set_remote_argv(repo: Path, url: str) -> list[str]:
    return ["git", "-C", str(repo), "config", "remote.origin.url", url]


def lfs_fetch_argv(repo: Path, commit: str, paths: Sequence[str]) -> list[str]:
    return ["git", "-C", str(repo), "lfs", "fetch", f"--include={','.join(paths)}", "--", "origin", commit]


def ls_tree_argv(repo: Path, commit: str) -> list[str]:
    return ["git", "-C", str(repo), "ls-tree", "-r", "-l", "-z", "--end-of-options", commit]


def cat_file_argv(repo: Path) -> list[str]:
    return ["git", "-C", str(repo), "cat-file", "--batch"]


def parse_ls_tree(out: bytes) -> list[TreeEntry]:
    entries = []
    for record in filter(None, out.split(b"\0")):
        meta, path = record.decode().split("\t", 1)
        mode, kind, _obj, size = meta.split()
        entries.append(TreeEntry(mode=mode, kind=kind, size=int(size) if size != "-" else 0, path=path))
    return entries


def parse_cat_file_batch(out: bytes, count: int) -> list[bytes]:
    """Split `git cat-file --batch` output: '<oid> <type> <size>\\n<content>\\n' per object."""
    blobs, pos = [], 0
    for _ in range(count):
        header_end = out.index(b"\n", pos)
        size = int(out[pos:header_end].split()[2])
        blobs.append(out[header_end + 1 : header_end + 1 + size])
        pos = header_end + 1 + size + 1
    return blobs


def select(entries: Sequence[TreeEntry], include: Sequence[str], exclude: Sequence[str]) -> list[TreeEntry]:
    chosen = []
    for e in entries:
        if e.kind != "blob" or (include and not any(fnmatch(e.path, g) for g in include)) or any(fnmatch(e.path, g) for g in exclude):
            continue
        if e.mode == "120000":
            raise UnsafePathError(f"{e.path}: the repository has a symlink here; the store holds real files only. Add it to `exclude` in models.toml.")
        chosen.append(e)
    return chosen


@dataclass(frozen=True)
class GitSource:
    url: str

    def _git(self, argv: list[str], stdin: bytes | None = None) -> bytes:
        try:
            return run(argv, env=GIT_ENV | auth_env(self.url), stdin=stdin)
        except CommandError as exc:
            raise _source_error(self.url, exc) from exc

    def _fetch_commit(self, repo: Path, revision: str) -> str:
        if GIT_COMMIT.match(revision) and self._has_commit(repo, revision):
            return revision
        self._git(fetch_argv(repo, self.url, revision))
        commit = self._git(["git", "-C", str(repo), "rev-parse", "FETCH_HEAD"]).decode().strip()
        if not GIT_COMMIT.match(commit):
            raise SourceError(f"git {redact(self.url)}: {revision} resolved to {commit[:80]!r}, not a commit id. Check `revision` in models.toml.")
        return commit

    def _has_commit(self, repo: Path, commit: str) -> bool:
        try:
            run(["git", "-C", str(repo), "cat-file", "-e", f"{commit}^{{commit}}"], env=GIT_ENV)
            return True
        except CommandError:
            return False

    def _blobs(self, repo: Path, commit: str, paths: Sequence[str]) -> list[bytes]:
        stdin = "".join(f"{commit}:{p}\n" for p in paths).encode()
        return parse_cat_file_batch(self._git(cat_file_argv(repo), stdin=stdin), len(paths))

    def resolve(self, spec: ModelSpec) -> LockedModel:
        with tempfile.TemporaryDirectory(prefix="bakehouse-lock-") as tmp:
            repo = Path(tmp)
            self._git(init_argv(repo))
            commit = self._fetch_commit(repo, spec.revision or "HEAD")
            tree = parse_ls_tree(self._git(ls_tree_argv(repo, commit)))
            entries = select(tree, spec.include, spec.exclude)
            check_selection(spec, commit, [e.path for e in tree if e.kind == "blob"], [e.path for e in entries], fnmatch)
            files = tuple(_locked_file(e.path, blob) for e, blob in zip(entries, self._blobs(repo, commit, [e.path for e in entries]), strict=True))
        return LockedModel(name=spec.name, source=spec.source, revision=spec.revision, commit=commit, spec=spec_fingerprint(spec), files=files, allow_pickle=spec.allow_pickle)

    def fetch(self, model: LockedModel, files: Sequence[LockedFile], job: FetchJob) -> dict[str, str]:
        """Shallow-fetch the commit into job.partial (resumable), `git lfs fetch` the weights, lay files out in staging."""
        repo = job.partial
        if not (repo / ".git").exists():
            self._git(init_argv(repo))
        self._fetch_commit(repo, model.commit)
        self._git(set_remote_argv(repo, self.url))
        blobs = dict(zip([f.path for f in files], self._blobs(repo, model.commit, [f.path for f in files]), strict=True))
        lfs_paths = [p for p, b in blobs.items() if parse_lfs_pointer(b)]
        if lfs_paths:
            self._git(lfs_fetch_argv(repo, model.commit, lfs_paths))
        known = {}
        for f in files:
            if job.cancel.is_set():
                raise Cancelled()
            pointer = parse_lfs_pointer(blobs[f.path])
            dest = job.staging / f.path
            if pointer:
                _place(job.root, repo / ".git" / "lfs" / "objects" / pointer.oid[:2] / pointer.oid[2:4] / pointer.oid, dest)
            else:
                safefs.write_file(job.root, dest, blobs[f.path])
                known[f.path] = hashlib.sha256(blobs[f.path]).hexdigest()
            job.progress.update(f.size)
        return known


def _locked_file(path: str, blob: bytes) -> LockedFile:
    pointer = parse_lfs_pointer(blob)
    if pointer and pointer.size >= 0:
        return LockedFile(path=safe_relpath(path), size=pointer.size, sha256=pointer.oid)
    return LockedFile(path=safe_relpath(path), size=len(blob), sha256=hashlib.sha256(blob).hexdigest())


def _place(root: Path, obj: Path, dest: Path) -> None:
    """Hard-link the LFS object (no copy); the git dir is deleted after activation."""
    safefs.makedirs(root, dest.parent)
    tmp = dest.with_name(f".{dest.name}.tmp")
    safefs.remove(root, tmp)
    try:
        os.link(obj, tmp)
    except OSError:
        with open(obj, "rb") as src, os.fdopen(safefs.open_file(root, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)
    os.replace(tmp, dest)


def _source_error(url: str, exc: CommandError) -> SourceError:
    err = redact(exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else f"exit {exc.returncode}")
    where = redact(url)
    if _AUTH.search(exc.stderr):
        return SourceAuthError(f"git {where}: authentication refused ({err}). Give git credentials for this remote (a credential helper, GIT_ASKPASS, "
                               "or a token in the URL, which bakehouse never prints), then re-run.")
    if "couldn't find remote ref" in exc.stderr or "not our ref" in exc.stderr:
        return SourceNotFoundError(f"git {where}: revision not found ({err}). Check `revision` in models.toml, or re-lock if the commit was rewritten.")
    if "does not appear to be a git repository" in exc.stderr or "not found" in exc.stderr.lower():
        return SourceNotFoundError(f"git {where}: repository not found ({err}). Check `source` in models.toml and your access to it.")
    if "Could not resolve host" in exc.stderr or "Connection refused" in exc.stderr or "unable to access" in exc.stderr:
        return SourceUnreachableError(f"git {where}: cannot reach the remote ({err}). Check the network and proxy settings, then re-run.")
    return SourceError(f"git {where}: `{' '.join(exc.argv[3:5])}` failed: {err}. Check that git and git-lfs are installed (`git lfs version`) and the remote is reachable.")
