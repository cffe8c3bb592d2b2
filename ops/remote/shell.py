"""Where a host's commands go: over SSH, or printed for --dry-run. The steps that use a shell do not know which.

Every command is an argv list built by a pure function; a shell runs it (or
prints it) and answers with a RemoteResult. What the answer means is the
caller's `kind`:

    action   must exit 0 (or one of `allow`); anything else is a StepFailedError
    query    any exit status is the answer (does this exist? which version?)
    probe    the /ready probe of the health gate
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from fabric import Connection

from ops.errors import StepFailedError, redact
from ops.remote.inventory import Host
from ops.remote.ssh import RemoteResult, SshOptions, connect, put_file, run_remote

Kind = Literal["action", "query", "probe"]
Say = Callable[[str], None]


class Shell(Protocol):
    host: Host
    dry_run: bool

    def run(self, argv: Sequence[str], *, stdin: str | None = None, kind: Kind = "action", what: str = "", allow: Sequence[int] = (),
            on_stderr_line: Say | None = None) -> RemoteResult: ...
    def put(self, local: Path, remote: str) -> None: ...
    def get(self, remote: str, local: Path) -> None: ...
    def size(self, remote: str) -> int | None: ...
    def say(self, line: str) -> None:
        """A progress line (silent in a dry run: nothing happened)."""
    def note(self, line: str) -> None:
        """What a step does without a host command (a webhook, a local fetch): a comment in the dry-run transcript."""
    def close(self) -> None: ...


def checked(host: Host, argv: Sequence[str], result: RemoteResult, kind: Kind, what: str, allow: Sequence[int]) -> RemoteResult:
    """The result, or StepFailedError when an action failed: what every shell does with an answer."""
    if kind == "action" and result.exit_code != 0 and result.exit_code not in allow:
        detail = (result.stderr.strip() or result.stdout.strip())[-500:] or f"exit {result.exit_code}"
        step = what or shlex.join(argv)[:120]
        raise StepFailedError(f"{host.name}: {step} failed: {redact(detail)}", host=host.name, step=step)
    return result


@dataclass
class SshShell:
    """Runs each command on the host over one SSH connection, opened at the first command and kept until close()."""

    host: Host
    options: SshOptions
    on_line: Say = lambda line: None
    dry_run: bool = False
    _conn: Connection | None = field(default=None, repr=False)

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            self._conn = connect(self.host, self.options)
        return self._conn

    def run(self, argv: Sequence[str], *, stdin: str | None = None, kind: Kind = "action", what: str = "", allow: Sequence[int] = (),
            on_stderr_line: Say | None = None) -> RemoteResult:
        result = run_remote(self.conn, argv, host=self.host.name, stdin=stdin, timeout=self.options.command_timeout, on_stderr_line=on_stderr_line)
        return checked(self.host, argv, result, kind, what, allow)

    def put(self, local: Path, remote: str) -> None:
        put_file(self.conn, local, remote)

    def get(self, remote: str, local: Path) -> None:
        self.conn.sftp().get(remote, str(local))

    def size(self, remote: str) -> int | None:
        try:
            return self.conn.sftp().stat(remote).st_size
        except OSError:
            return None

    def say(self, line: str) -> None:
        self.on_line(line)

    def note(self, line: str) -> None:
        self.on_line(line)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass
class DryShell:
    """Prints what would run, answering as a host that has nothing yet and a release that becomes ready."""

    host: Host
    lines: list[str] = field(default_factory=list)
    dry_run: bool = True

    def run(self, argv: Sequence[str], *, stdin: str | None = None, kind: Kind = "action", what: str = "", allow: Sequence[int] = (),
            on_stderr_line: Say | None = None) -> RemoteResult:
        self.lines.append(shlex.join(argv) + ("    # stdin: (not shown)" if stdin is not None else ""))
        if kind == "probe":
            return RemoteResult(0, "200", "")
        return RemoteResult(1 if kind == "query" else 0, "", "")

    def put(self, local: Path, remote: str) -> None:
        self.lines.append(f"# upload {local} -> {remote}")

    def get(self, remote: str, local: Path) -> None:
        self.lines.append(f"# download {remote} -> {local}")

    def size(self, remote: str) -> int | None:
        return None

    def say(self, line: str) -> None:
        pass

    def note(self, line: str) -> None:
        self.lines.append(f"# {line}")

    def close(self) -> None:
        pass


def shell_factory(options: SshOptions, *, dry_run: bool = False) -> Callable[[Host, Say], Shell]:
    """A shell per host: SSH, or the dry run's printer."""
    if dry_run:
        return lambda host, say: DryShell(host)
    return lambda host, say: SshShell(host, options, say)
