"""What a model command reports: one Outcome per model, in a Report (printed as a table or JSON).

A failed Outcome keeps its exception object; the JSON carries the error's
type and data, so a host's report read back on the control machine
(`Report.from_json`) holds the same errors with the same exit codes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ops.errors import EXIT_OK, BakehouseError, VerificationError, error_fields, rebuild
from ops.units import format_bytes


def _details(data: dict[str, Any]) -> dict[str, Any]:
    details = data.get("error_details")
    return details if isinstance(details, dict) else {}


Status = Literal["new", "unchanged", "updated", "up-to-date", "activated", "downloaded", "verified (quick)", "verified (full)", "failed"]
STATUSES: tuple[Status, ...] = get_args(Status)


@dataclass
class Outcome:
    """What happened to one model; the unit every report is made of."""

    model: str
    status: Status
    commit: str | None = None
    path: str | None = None
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    error: BakehouseError | None = None

    @property
    def problems(self) -> tuple[str, ...]:
        return self.error.problems if isinstance(self.error, VerificationError) else ()

    @property
    def exit_code(self) -> int:
        return self.error.exit_code if self.error else EXIT_OK

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, model: str, exc: BakehouseError, **kw: Any) -> Outcome:
        return cls(model=model, status="failed", error=exc, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "status": self.status, "commit": self.commit, "path": self.path, "files": self.files,
            "bytes": self.bytes, "seconds": self.seconds, "warnings": self.warnings, "problems": list(self.problems),
            **error_fields(self.error), "exit_code": self.exit_code, "ok": self.ok,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        error = None
        if data.get("error_type") or data.get("error") or data.get("problems"):
            kind = data.get("error_type") or ("VerificationError" if data.get("problems") else "BakehouseError")
            message = data.get("error") or "; ".join(data.get("problems", []))
            error = rebuild({"problems": data.get("problems", []), **_details(data), "type": kind, "message": message})
        status = data.get("status")
        if status not in STATUSES:
            raise ValueError(f"a model's status {status!r} is not one bakehouse reports")
        keep = ("model", "commit", "path", "files", "bytes", "seconds", "warnings")
        return cls(**{k: data[k] for k in keep if k in data}, status=status, error=error)


@dataclass
class Report:
    command: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    error: BakehouseError | None = None  # the command failed as a whole (bad lock, …), before any model

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return self.error.exit_code
        return max((o.exit_code for o in self.outcomes), default=EXIT_OK)

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    def failures(self) -> list[BakehouseError]:
        """Every error in the report, the command's own first."""
        return [e for e in (self.error, *(o.error for o in self.outcomes)) if e is not None]

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"command": self.command, "ok": self.ok, "exit_code": self.exit_code, "seconds": round(self.seconds, 3)}
        if self.error is not None:
            body |= error_fields(self.error)
        body["models"] = [o.to_dict() for o in self.outcomes]
        return body

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Report:
        """A report printed by `python -m ops.models … --json` (on a host); ValueError when `text` is not one."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("models", []), list):
            raise ValueError("not a bakehouse report")
        error = rebuild({**_details(data), "type": data.get("error_type") or "BakehouseError", "message": data["error"]}) if data.get("error") else None
        return cls(command=str(data.get("command", "")), outcomes=[Outcome.from_dict(m) for m in data.get("models", [])], seconds=float(data.get("seconds", 0)), error=error)

    def render(self) -> str:
        lines = [f"error: {self.error}"] if self.error else []
        for o in self.outcomes:
            size = f"  {format_bytes(o.bytes)}" if o.bytes else ""
            commit = f" @ {o.commit[:12]}" if o.commit else ""
            lines.append(f"{o.model}{commit}: {o.status}{size}  ({o.seconds:.2f}s)")
            if o.error and not o.problems:
                lines.append(f"  error: {o.error}")
            lines += [f"  FAIL {p}" for p in o.problems]
            lines += [f"  warn {w}" for w in o.warnings]
        verdict = "ok" if self.exit_code == 0 else f"failed (exit {self.exit_code})"
        lines.append(f"{self.command}: {len(self.outcomes)} model(s), {verdict}")
        return "\n".join(lines)
