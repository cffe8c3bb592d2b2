"""The health gate: an instance counts only once it answers /ready, and a crash fails the gate at once."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ops.deploy import common
from ops.deploy.target import Target
from ops.errors import NotReadyError
from ops.remote.shell import Shell

POLL_S = 0.25  # a probe is one SSH round trip; the gap it adds to the measured hold stays small


@dataclass(frozen=True)
class Gate:
    """One look at an instance: its /ready answer and whether its process is up."""

    ready: bool
    answer: str
    alive: bool


def gate(sh: Shell, t: Target, port: int, alive: Sequence[str]) -> Gate:
    """The probe of 127.0.0.1:<port>/ready on the host and the liveness check, in one SSH round trip."""
    answer, _, state = sh.run(common.gate_argv(t.host.python, port, list(alive)), kind="probe").stdout.strip().rpartition("\n")
    return Gate(ready=(answer or state).split(" ", 1)[0] == "200", answer=answer, alive=state != "dead")


def serving(sh: Shell, t: Target, port: int, alive: Sequence[str]) -> bool:
    g = gate(sh, t, port, alive)
    return g.ready and g.alive


def wait_ready(sh: Shell, t: Target, port: int, alive: Sequence[str], logs: Sequence[str]) -> None:
    """Return once the instance answers /ready 200; NotReadyError (why, with its last log lines) when it exits first or the time is up."""
    deadline = time.monotonic() + t.ready_timeout
    last = ""
    while True:
        g = gate(sh, t, port, alive)
        if g.ready:
            return
        last = g.answer or last
        if not g.alive:
            why = "the app exited before it became ready"
            break
        if time.monotonic() > deadline:
            why = f"not ready after {t.ready_timeout:.0f}s (last /ready answer: {last or 'none'})"
            break
        time.sleep(POLL_S)
    tail = sh.run(list(logs), kind="query").stdout.strip().splitlines()[-5:]
    reason = why + (". Last log lines: " + " | ".join(tail) if tail else "")
    raise NotReadyError(reason, host=t.name, reason=reason)
