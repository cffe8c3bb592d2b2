"""A model command for many hosts: what to run, where the lock is, how to reach and walk the hosts."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ops.errors import LockError
from ops.models.lock import LockedModel, load_lock
from ops.remote.executor import Rollout
from ops.remote.ssh import SshOptions
from ops.settings import read_text

FleetCommand = Literal["fetch", "verify"]
Engine = Literal["ssh", "ansible"]
ENGINES: tuple[Engine, ...] = ("ssh", "ansible")


FanOutMode = Literal["local", "host", "peers"]
FAN_OUT_MODES: tuple[FanOutMode, ...] = ("local", "host", "peers")


@dataclass(frozen=True)
class FanOut:
    """The origin serves each file once.

    local: fetched into `store` on this machine, then copied to every host through it;
    host:  fetched first on `from_host`, then copied through this machine;
    peers: hosts copy verified files from each other (ops.remote.peers); this machine carries no weights.
    """

    mode: FanOutMode
    store: Path
    from_host: str | None = None


@dataclass(frozen=True)
class AnsibleOptions:
    serial: str = "100%"  # hosts per batch, a number or a percentage
    max_fail_percentage: int = 100


@dataclass(frozen=True)
class FleetJob:
    command: FleetCommand
    lock: Path
    models: tuple[str, ...] = ()
    full: bool = False
    ssh: SshOptions = field(default_factory=SshOptions)
    rollout: Rollout = field(default_factory=Rollout)
    fan_out: FanOut | None = None
    engine: Engine = "ssh"
    ansible: AnsibleOptions = field(default_factory=AnsibleOptions)
    dry_run: bool = False

    # The lock is read once per run, not once per host.
    @functools.cached_property
    def lock_text(self) -> str:
        """The lock as every host receives it."""
        return read_text(self.lock, LockError, "models.lock", "Run `invoke lock-models`, or pass --lock FILE.")

    @functools.cached_property
    def selected(self) -> list[LockedModel]:
        """The lock's models this job is for (`models`, else the lock's default)."""
        return load_lock(self.lock).select(list(self.models) or None)
