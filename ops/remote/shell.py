"""Where a host's commands go: over SSH, or printed for --dry-run. The steps that use a shell do not know which.

Every command is an argv list built by a pure function; a shell runs it (or
prints it) and answers with a RemoteResult. What the answer means is the
caller's `kind`:

    action   must exit 0 (or one of `allow`); anything else is a StepFailedError
    query    any exit status is the answer (does this exist? which version?)
    value    must exit 0 and print what the step goes on with (a port)
    report   a model command: its stdout is the JSON report (app.models.report), whatever its exit status
    probe    the /ready probe of the health gate

Work a step does here rather than on the host (a webhook's POST) goes through
`local`, so a dry run notes it instead. No step asks which shell it has.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from fabric import Connection

from ops.errors import StepFailedError, redact
from ops.remote.inventory import Host
from ops.remote.ssh import RemoteResult, SshOptions, connect, put_file, run_remote

Kind = Literal["action", "query", "value", "report", "probe"]
Say = Callable[[str], None]
T = TypeVar("T")
EMPTY_REPORT = '{"command": "", "models": []}'


class Shell(Protocol):
    host: Host

    def run(self, argv: Sequence[str], *, stdin: str | None = None, kind: Kind = "action", what: str = "", allow: Sequence[int] = (),
            on_stderr_line: Say | None = None) -> RemoteResult: ...
    def put(self, local: Path, remote: str) -> None: ...
    def get(self, remote: str, local: Path) -> None: ...
    def size(self, remote: str) -> int | None: ...
    def say(self, line: str) -> None:
        """A progress line (silent in a dry run: nothing happened)."""
    def note(self, line: str) -> None:
        """What a step decides without a host command: a comment in the dry-run transcript."""
    def local(self, line: str, action: Callable[[], T], *, dry: T) -> T:
        """Work done on this machine for the host (a webhook's POST): run it; a dry run notes `line` and answers `dry`."""
    def close(self) -> None: ...


def checked(host: Host, argv: Sequence[str], result: RemoteResult, kind: Kind, what: str, allow: Sequence[int]) -> RemoteResult:
    """The result, or StepFailedError when an action failed: what every shell does with an answer."""
    if kind in ("action", "value") and result.exit_code != 0 and result.exit_code not in allow:
        detail = (result.stderr.strip() or result.stdout.strip())[-500:] or f"exit {result.exit_code}"
        step = what or shlex.join(argv)[:120]
        raise StepFailedError(f"{step} failed: {redact(detail)}", host=host.name, step=step)
    return result


@dataclass
class SshShell:
    """Runs each command on the host over one SSH connection, opened at the first command and kept until close()."""

    host: Host
    options: SshOptions
    on_line: Say = lambda line: None
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

    def local(self, line: str, action: Callable[[], T], *, dry: T) -> T:
        return action()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass
class DryShell:
    """Prints what would run, answering as a host that has nothing yet and a release that becomes ready."""

    host: Host
    lines: list[str] = field(default_factory=list)

    def run(self, argv: Sequence[str], *, stdin: str | None = None, kind: Kind = "action", what: str = "", allow: Sequence[int] = (),
            on_stderr_line: Say | None = None) -> RemoteResult:
        self.lines.append(shlex.join(argv) + ("    # stdin: (not shown)" if stdin is not None else ""))
        answers = {"probe": RemoteResult(0, "200", ""), "query": RemoteResult(1, "", ""), "value": RemoteResult(0, f"<{what or 'value'}>", ""),
                   "report": RemoteResult(0, EMPTY_REPORT, "")}
        return answers.get(kind, RemoteResult(0, "", ""))

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

    def local(self, line: str, action: Callable[[], T], *, dry: T) -> T:
        self.note(line)
        return dry

    def close(self) -> None:
        pass


def shell_factory(options: SshOptions, *, dry_run: bool = False) -> Callable[[Host, Say], Shell]:
    """A shell per host: SSH, or the dry run's printer."""
    if dry_run:
        return lambda host, say: DryShell(host)
    return lambda host, say: SshShell(host, options, say)
