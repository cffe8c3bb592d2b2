"""`fetch-models` / `verify-models` on hosts: which engine runs the job, and fan-out around it.

    ssh       this process drives every host over SSH (ops.remote.ssh_engine)
    ansible   ansible-playbook runs the same planned argv (ops.remote.ansible)

With fan-out the origin serves each file once: `local` and `host` copy the
verified files to every host through this machine (ops.remote.fanout),
`peers` lets the hosts copy them from each other (ops.remote.peers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ops.errors import ConfigError
from ops.remote.ansible import run_with_ansible
from ops.remote.executor import HostResult, HostResults
from ops.remote.fanout import seed_host, seed_locally
from ops.remote.hostmodels import HostModels
from ops.remote.inventory import Host
from ops.remote.job import FleetJob
from ops.remote.peers import run_with_peers
from ops.remote.ssh_engine import copy_through_controller, run_with_ssh


def run_fleet(job: FleetJob, hosts: Sequence[Host], inventory: Path) -> HostResults[HostModels]:
    """Run the job on every host; one row per host, in the order given."""
    fan_out = job.fan_out if job.command == "fetch" else None
    if job.engine == "ansible":
        if fan_out is not None:
            raise ConfigError("fan-out (--fan-out, --from-local, --from-host) runs with the ssh engine; drop --engine ansible.")
        if job.dry_run:
            raise ConfigError("--dry-run shows the ssh engine's commands; drop --engine ansible (the playbook runs the same argv).")
        return run_with_ansible(hosts, job, inventory)
    if fan_out is None:
        return run_with_ssh(hosts, job)
    if fan_out.mode == "peers":
        return run_with_peers(hosts, job)
    if fan_out.mode == "host":
        return _from_host(hosts, job, seed_host(hosts, fan_out.from_host or ""))
    if not job.dry_run:
        seed_locally(job, fan_out.store)
    return run_with_ssh(hosts, job, seed=fan_out.store)


def _from_host(hosts: Sequence[Host], job: FleetJob, seed: Host) -> HostResults[HostModels]:
    """The seed host fetches first; the others copy its verified files (through this machine), or are not attempted if it failed."""
    first = run_with_ssh([seed], job)
    others = [h for h in hosts if h is not seed]
    if first.failed:
        return HostResults(job.command, [*first, *(HostResult(h, attempted=False) for h in others)], first.view)
    rest = copy_through_controller(seed, others, job)
    return HostResults(job.command, [*first, *rest], first.view)
