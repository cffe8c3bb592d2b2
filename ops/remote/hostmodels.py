"""A host's answer to a model command: its bootstrap and the report its `python -m ops.models … --json` printed.

Both engines (SSH and Ansible) read the same JSON report back into a Report
whose errors are the same classes, with the same exit codes, as on the host.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from ops.errors import NoReportError
from ops.models.report import Report
from ops.remote.executor import LOUD_UP_TO, HostResult, HostResults
from ops.units import format_bytes, format_rate


@dataclass
class HostModels:
    bootstrap: str  # installed | unchanged | "" (the Ansible engine does not say)
    report: Report

    @property
    def exit_code(self) -> int:
        return self.report.exit_code

    def reason(self) -> str | None:
        failures = self.report.failures()
        return str(failures[0]) if failures else None

    def summary(self) -> str:
        return "ok" if self.exit_code == 0 else f"FAILED: {self.reason()}"

    def to_dict(self) -> dict[str, Any]:
        body = self.report.to_dict()
        return {"bootstrap": self.bootstrap, "outcomes": body["models"], **({"error": body["error"]} if "error" in body else {})}


def parse_report(host: str, stdout: str, stderr: str) -> Report:
    """The report a host's model command printed; NoReportError with its last error line when it printed none."""
    try:
        return Report.from_json(stdout)
    except ValueError as exc:
        tail = stderr.strip().splitlines()[-1:] or ["the model command printed no report"]
        raise NoReportError(tail[0], host=host, step="model command") from exc


class ModelsView:
    """host | model | result | bytes | time | rate, one row per host and model; why each failure, below."""

    header: tuple[str, ...] = ("host", "model", "result", "bytes", "time", "rate")

    def rows(self, r: HostResult[HostModels]) -> list[tuple[str, ...]]:
        outcomes = r.value.report.outcomes if r.value is not None else []
        if not outcomes:
            return [(r.host.name, "-", "FAILED" if not r.ok else ("not attempted" if not r.attempted else "ok"), "-", f"{r.seconds:.1f}s", "-")]
        return [(r.host.name, o.model, o.status if o.ok else "FAILED", format_bytes(o.bytes), f"{o.seconds:.1f}s", format_rate(o.bytes, o.seconds) if o.bytes else "-")
                for o in outcomes]

    def reasons(self, r: HostResult[HostModels]) -> list[str]:
        host = r.host.name
        if r.error is not None:
            return [f"{host}: {r.error}"]
        if r.value is None:
            return []
        report = r.value.report
        lines = [f"{host}: {report.error}"] if report.error else []
        lines += [f"{host} {o.model}: {o.error if not o.problems else '; '.join(o.problems)}" for o in report.outcomes if not o.ok]
        return lines + [f"{host} {o.model}: warning: {w}" for o in report.outcomes if o.ok for w in o.warnings]

    def fields(self, r: HostResult[HostModels]) -> dict[str, Any]:
        return r.value.to_dict() if r.value is not None else {"bootstrap": "", "outcomes": []}

    def closing(self, results: HostResults[HostModels]) -> str:
        failed = len(results.failed)
        line = f"{len(results)} host(s), {failed} failed" + (f" (exit {results.exit_code})" if failed else "")
        if len(results) > LOUD_UP_TO:  # a long table: the counts by result, where they can be read at once
            counts = Counter(row[2] for r in results for row in self.rows(r))
            line += "; " + ", ".join(f"{status} {n}" for status, n in counts.most_common())
        return line
