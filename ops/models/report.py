"""What a model command reports: one Outcome per model (and, remotely, per host)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ops.errors import BakehouseError
from ops.units import format_bytes


@dataclass
class Outcome:
    """What happened to one model; the unit every report is made of."""

    model: str
    status: str
    commit: str | None = None
    path: str | None = None
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    exit_code: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @classmethod
    def failed(cls, model: str, exc: BakehouseError, **kw) -> Outcome:
        return cls(model=model, status="failed", error=str(exc), exit_code=exc.exit_code, **kw)


@dataclass
class Report:
    command: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return max((o.exit_code for o in self.outcomes), default=0)

    def to_json(self) -> str:
        body = {"command": self.command, "ok": self.exit_code == 0, "exit_code": self.exit_code, "seconds": round(self.seconds, 3)}
        body["models"] = [asdict(o) | {"ok": o.ok} for o in self.outcomes]
        return json.dumps(body, indent=2)

    def render(self) -> str:
        lines = []
        for o in self.outcomes:
            size = f"  {format_bytes(o.bytes)}" if o.bytes else ""
            commit = f" @ {o.commit[:12]}" if o.commit else ""
            lines.append(f"{o.model}{commit}: {o.status}{size}  ({o.seconds:.2f}s)")
            if o.error:
                lines.append(f"  error: {o.error}")
            lines += [f"  FAIL {p}" for p in o.problems]
            lines += [f"  warn {w}" for w in o.warnings]
        verdict = "ok" if self.exit_code == 0 else f"failed (exit {self.exit_code})"
        lines.append(f"{self.command}: {len(self.outcomes)} model(s), {verdict}")
        return "\n".join(lines)
