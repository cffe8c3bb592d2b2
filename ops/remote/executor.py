"""One executor for every command that touches many hosts: fetch, verify, deploy, rollback.

Hosts run `parallel` at a time. With `batch`, they run in rolling batches,
and `stop_after_failure` leaves every host after a failed batch untouched
("not attempted"). Each host gets its own shell (one SSH connection, opened at
its first command and closed after its step, or a dry-run shell that prints),
and its step returns a value or raises. Like Fabric's GroupResult, the result
keeps each host's value or exception object; it knows which hosts failed and
the exit code (the worst host's), and renders the table, `--json`, or the
dry-run transcript. One host's failure is its own row, never another's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from ops.errors import EXIT_OK, BakehouseError, RemoteError, error_fields, redact
from ops.remote.inventory import Host
from ops.remote.shell import DryShell, Say, Shell
from ops.settings import progress_seconds

log = logging.getLogger("bakehouse.hosts")


class Value(Protocol):
    """What a step returns for its host."""

    @property
    def exit_code(self) -> int: ...
    def summary(self) -> str: ...


T = TypeVar("T", bound=Value)


@dataclass
class HostResult(Generic[T]):
    host: Host
    value: T | None = None
    error: BakehouseError | None = None
    seconds: float = 0.0
    attempted: bool = True
    transcript: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return self.error.exit_code
        return self.value.exit_code if self.value is not None else EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    def summary(self) -> str:
        if self.error is not None:
            return f"FAILED: {self.error}"
        return self.value.summary() if self.value is not None else "not attempted"

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host.name, "runtime": self.host.runtime, "ok": self.ok, "exit_code": self.exit_code, "attempted": self.attempted,
                "seconds": round(self.seconds, 3), **error_fields(self.error)}


class View(Protocol[T]):
    """How one kind of result is shown: the table's columns, a host's rows, why each failed, the closing line, its --json fields."""

    header: tuple[str, ...]

    def rows(self, r: HostResult[T]) -> list[tuple[str, ...]]: ...
    def reasons(self, r: HostResult[T]) -> list[str]: ...
    def closing(self, results: HostResults[T]) -> str: ...
    def fields(self, r: HostResult[T]) -> dict[str, Any]: ...


@dataclass
class HostResults(Generic[T]):
    command: str
    results: list[HostResult[T]]
    view: View[T]

    def __iter__(self) -> Iterator[HostResult[T]]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, name: str) -> HostResult[T]:
        return next(r for r in self.results if r.host.name == name)

    @property
    def failed(self) -> list[HostResult[T]]:
        return [r for r in self.results if not r.ok]

    @property
    def exit_code(self) -> int:
        return max((r.exit_code for r in self.results), default=EXIT_OK)

    def table(self) -> str:
        rows = [self.view.header, *(row for r in self.results for row in self.view.rows(r))]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.view.header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.append(self.view.closing(self))
        # One line a reason: a host's error text (ansible's, a remote traceback's last line) may hold line breaks, which would read as
        # reasons of other hosts.
        return "\n".join(lines + [" ".join(reason.split()) for r in self.results for reason in self.view.reasons(r)])

    def to_json(self) -> str:
        hosts = [r.to_dict() | self.view.fields(r) for r in self.results]
        return json.dumps({"command": self.command, "exit_code": self.exit_code, "hosts": hosts}, indent=2)

    def transcript(self) -> str:
        """A dry run: every command each host would run, in order."""
        out = []
        for r in self.results:
            h = r.host
            out.append(f"# {h.name} ({h.runtime}, {h.user}@{h.address}:{h.port})")
            out += r.transcript
            if r.error is not None:
                out.append(f"# stops here: {r.error}")
        return "\n".join(out)

    def render(self, *, as_json: bool = False, dry_run: bool = False) -> str:
        return self.transcript() if dry_run else self.to_json() if as_json else self.table()


@dataclass(frozen=True)
class Rollout:
    """How hosts are walked."""

    parallel: int = 8  # hosts at a time
    batch: int | None = None  # hosts per rolling batch; None: all of them as one batch
    stop_after_failure: bool = False  # after a batch with a failed host, the others are not attempted


ShellFactory = Callable[[Host, Say], Shell]
Step = Callable[[Shell], T]


LOUD_UP_TO = 16  # more hosts than this: a running count instead of every host's lines (failures still show at once)


@dataclass
class Tally:
    """How far a run over many hosts is: what a person can read at 200 hosts."""

    command: str
    total: int
    running: int = 0
    ok: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def line(self) -> str:
        return f"{self.command}: {self.ok + self.failed}/{self.total} host(s) done ({self.ok} ok, {self.failed} failed), {self.running} running"


def run_each(command: str, hosts: Sequence[Host], step: Step[T], *, shells: ShellFactory, view: View[T], rollout: Rollout = Rollout(),
             say: Callable[[str, str], None] | None = None) -> HostResults[T]:
    """Run `step` once per host (its shell knows the host); every host gets a row, in the order given."""
    say = say or (lambda host, line: log.info("[%s] %s", host, line))
    tally = Tally(command, len(hosts))
    loud = len(hosts) <= LOUD_UP_TO
    done = threading.Event()
    if not loud:
        threading.Thread(target=_report, args=(tally, done), name="tally", daemon=True).start()
    results: list[HostResult[T]] = []
    size = rollout.batch or max(1, len(hosts))
    try:
        for start in range(0, len(hosts), size):
            batch = hosts[start : start + size]
            if rollout.stop_after_failure and any(r.attempted and not r.ok for r in results):
                results += [HostResult(h, attempted=False) for h in batch]
                continue
            with ThreadPoolExecutor(max_workers=max(1, min(rollout.parallel, len(batch))), thread_name_prefix="host") as pool:
                results += list(pool.map(lambda h: _one(h, step, shells, say, tally, loud), batch))
    finally:
        done.set()
    if not loud:
        log.info("%s", tally.line())
    return HostResults(command, results, view)


def _report(tally: Tally, done: threading.Event) -> None:
    while not done.wait(progress_seconds()):
        log.info("%s", tally.line())


def _one(host: Host, step: Step[T], shells: ShellFactory, say: Callable[[str, str], None], tally: Tally, loud: bool) -> HostResult[T]:
    start = time.monotonic()
    shell = shells(host, (lambda line: say(host.name, line)) if loud else (lambda line: None))
    result: HostResult[T] = HostResult(host)
    with tally.lock:
        tally.running += 1
    try:
        result.value = step(shell)
    except BakehouseError as exc:
        result.error = exc
    except Exception as exc:  # a host's surprise (SSH dropped mid-command, …) is its own row, not everyone's crash
        wrapped = RemoteError(f"{type(exc).__name__}: {redact(str(exc))}", host=host.name)
        wrapped.__cause__ = exc
        result.error = wrapped
    finally:
        shell.close()
    result.seconds = time.monotonic() - start
    with tally.lock:
        tally.running -= 1
        tally.ok, tally.failed = tally.ok + result.ok, tally.failed + (not result.ok)
    if isinstance(shell, DryShell):
        result.transcript = tuple(shell.lines)
    elif loud or not result.ok:
        say(host.name, result.summary())
    return result
