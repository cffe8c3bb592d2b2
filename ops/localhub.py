"""A local Hugging Face-compatible hub: git repositories with LFS, served by olah.

For the offline demo, the test suite, benchmarks and air-gapped sites. Repos
are committed with fixed author and dates, so the same files give the same
commit on every machine and the committed models.lock stays valid.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ops.net import free_port
from ops.runner import run, stop

FIXED_IDENTITY = {
    "GIT_AUTHOR_NAME": "bakehouse",
    "GIT_AUTHOR_EMAIL": "bakehouse@localhost",
    "GIT_COMMITTER_NAME": "bakehouse",
    "GIT_COMMITTER_EMAIL": "bakehouse@localhost",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf")


def make_repo(path: Path, files: Mapping[str, Path | bytes], *, message: str = "add model") -> str:
    """Create (or add a commit to) a git repo on branch main with weights in LFS; return the commit."""
    git = ["git", "-C", str(path)]
    if not (path / ".git").exists():
        path.mkdir(parents=True, exist_ok=True)
        run(["git", "init", "--quiet", "-b", "main", str(path)])
        run([*git, "lfs", "install", "--local"])
        # Written by hand: `git lfs track` orders patterns differently from run to run.
        (path / ".gitattributes").write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS))
    for rel, content in files.items():
        dest = path / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, dest)
        else:
            dest.write_bytes(content)
    run([*git, "add", "-A"])
    run([*git, "commit", "--quiet", "--allow-empty", "-m", message], env=FIXED_IDENTITY)
    return run([*git, "rev-parse", "HEAD"]).decode().strip()


@dataclass
class LocalHub:
    """olah on loopback serving `root/mirrors/models/<org>/<repo>` git repositories."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def repo_path(self, repo_id: str) -> Path:
        return self.root / "mirrors" / "models" / repo_id

    def add_repo(self, repo_id: str, files: Mapping[str, Path | bytes]) -> str:
        return make_repo(self.repo_path(repo_id), files)

    def config(self) -> str:
        return (
            f'[basic]\nhost = "127.0.0.1"\nport = {self.port}\nrepos-path = "{self.root / "repos"}"\n'
            f'mirrors-path = ["{self.root / "mirrors"}"]\nmirror-url = "{self.endpoint}"\nmirror-lfs-url = "{self.endpoint}"\n'
            "[accessibility]\noffline = true\n"
        )

    def start(self, timeout: float = 30.0) -> LocalHub:
        (self.root / "mirrors" / "models").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        conf = self.root / "olah.toml"
        conf.write_text(self.config())
        olah = shutil.which("olah-cli") or str(Path(sys.executable).with_name("olah-cli"))
        with open(self.root / "olah.log", "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen([olah, "-c", str(conf)], cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with {self.process.returncode}; see {self.root / 'olah.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"olah did not listen on {self.endpoint} within {timeout:.0f}s; see {self.root / 'olah.log'}")

    def stop(self) -> None:
        if self.process:
            stop(self.process)
        self.process = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
