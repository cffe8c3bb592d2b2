"""Where a deploy's host commands go: over SSH, or printed for --dry-run. The steps do not know which."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fabric import Connection

from ops.errors import BakehouseError, redact
from ops.remote.ssh import RemoteResult, put_file, run_remote


class StepFailed(BakehouseError):
    exit_code = 3


@dataclass
class SshShell:
    """Runs each step on the host. `query` steps may fail (their exit status is the answer); actions may not."""

    conn: Connection
    host: str
    say: Callable[[str], None]
    timeout: float | None = None

    def run(self, argv: Sequence[str], *, stdin: str | None = None, kind: str = "action", what: str = "") -> RemoteResult:
        result = run_remote(self.conn, argv, stdin=stdin, timeout=self.timeout)
        if kind == "action" and result.exit_code != 0:
            detail = (result.stderr.strip() or result.stdout.strip())[-500:] or f"exit {result.exit_code}"
            raise StepFailed(f"{self.host}: {what or shlex.join(argv)[:120]} failed: {redact(detail)}")
        return result

    def put(self, local: Path, remote: str) -> None:
        put_file(self.conn, local, remote)

    def size(self, remote: str) -> int | None:
        try:
            return self.conn.sftp().stat(remote).st_size
        except OSError:
            return None


@dataclass
class DryShell:
    """Prints what would run, answering as a host that has nothing yet and a release that becomes ready."""

    host: str
    lines: list[str] = field(default_factory=list)

    def run(self, argv: Sequence[str], *, stdin: str | None = None, kind: str = "action", what: str = "") -> RemoteResult:
        self.lines.append(shlex.join(argv) + ("    # stdin: (not shown)" if stdin is not None else ""))
        if kind == "probe":
            return RemoteResult(0, "200", "")
        return RemoteResult(1 if kind == "query" else 0, "", "")

    def put(self, local: Path, remote: str) -> None:
        self.lines.append(f"# upload {local} -> {remote}")

    def size(self, remote: str) -> int | None:
        return None
