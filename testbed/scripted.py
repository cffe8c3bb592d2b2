"""A shell that plays a script, as Invoke's MockContext does: each command must be the next one expected, with its answer.

Steps run against it in milliseconds, and an unexpected command fails the test
at once with what was expected instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ops.remote.inventory import Host
from ops.remote.shell import Kind, Say, checked
from ops.remote.ssh import RemoteResult

T = TypeVar("T")


def ok(stdout: str = "") -> RemoteResult:
    return RemoteResult(0, stdout, "")


def fails(code: int = 1, stdout: str = "") -> RemoteResult:
    return RemoteResult(code, stdout, "")


@dataclass
class ScriptedShell:
    host: Host
    script: list[tuple[list[str], RemoteResult]]
    said: list[str] = field(default_factory=list)

    def run(self, argv: Sequence[str], *, stdin: str | None = None, kind: Kind = "action", what: str = "", allow: Sequence[int] = (),
            on_stderr_line: Say | None = None) -> RemoteResult:
        assert self.script, f"unexpected command, the script has ended: {list(argv)}"
        expected, answer = self.script.pop(0)
        assert list(argv) == expected, f"expected {expected}\n     got {list(argv)}"
        return checked(self.host, argv, answer, kind, what, allow)

    def put(self, local: Path, remote: str) -> None:
        raise AssertionError(f"unexpected upload {local} -> {remote}")

    def get(self, remote: str, local: Path) -> None:
        raise AssertionError(f"unexpected download {remote} -> {local}")

    def size(self, remote: str) -> int | None:
        raise AssertionError(f"unexpected stat of {remote}")

    def say(self, line: str) -> None:
        self.said.append(line)

    def note(self, line: str) -> None:
        self.said.append(line)

    def local(self, line: str, action: Callable[[], T], *, dry: T) -> T:
        return action()

    def close(self) -> None:
        pass

    def done(self) -> None:
        assert not self.script, f"expected commands never ran: {[argv for argv, _ in self.script]}"
