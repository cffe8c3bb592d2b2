"""Fan-out: the hub serves each file once, then the verified copy is spread to the hosts.

`--from-local` fetches into a store on this machine first; `--from-host H`
fetches on H first and copies its verified files here. Either way each host
then gets the files in its staging area, verifies them fully against the lock
and activates them without asking the hub.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from pathlib import Path

from ops.errors import ConfigError
from ops.models.fetch import fetch_locked
from ops.models.lock import LockedModel
from ops.models.store import Store
from ops.remote import commands as rc
from ops.remote.inventory import Host
from ops.remote.job import FleetJob
from ops.remote.shell import Shell, SshShell
from ops.units import format_bytes


def seed_locally(job: FleetJob, store: Path) -> None:
    """Fetch once here; the first failure stops the fan-out before any host is touched."""
    for outcome in fetch_locked(job.selected, Store(store)):
        if outcome.error is not None:
            raise outcome.error


def download_from(host: Host, job: FleetJob, store: Path) -> None:
    """Copy the host's verified commit directories into a local store."""
    sh = SshShell(host, job.ssh)
    try:
        for model in job.selected:
            local = Store(store).commit_dir(model.name, model.commit)
            for f in model.files:
                (local / f.path).parent.mkdir(parents=True, exist_ok=True)
                sh.get(f"{host.models_dir}/{model.name}/{model.commit}/{f.path}", local / f.path)
    finally:
        sh.close()


def upload_staged(sh: Shell, model: LockedModel, store: Path) -> int:
    """Copy a verified model into the host's staging area; files already there at full size are skipped."""
    staging = f"{sh.host.models_dir}/.staging/{model.name}/{model.commit}"
    local = Store(store).commit_dir(model.name, model.commit)
    sh.run(rc.mkdir_argv(*sorted({posixpath.dirname(f"{staging}/{f.path}") for f in model.files})), what="create the staging directory")
    sent = 0
    for f in model.files:
        target = f"{staging}/{f.path}"
        if sh.size(target) == f.size:
            continue
        sh.put(local / f.path, target)
        sent += f.size
    sh.say(f"copied {format_bytes(sent)} of {model.name} into staging")
    return sent


def seed_host(hosts: Sequence[Host], name: str) -> Host:
    seed = next((h for h in hosts if h.name == name), None)
    if seed is None:
        raise ConfigError(f"--from-host {name}: not among the selected hosts ({', '.join(h.name for h in hosts)}).")
    return seed
