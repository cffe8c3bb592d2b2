"""The SSH engine: a model command on every host, from this process, through Fabric.

On each host: bootstrap a private venv from the wheelhouse (once per version),
upload models.lock (and, for fan-out, the verified files), then run the same
`python -m ops.models fetch|verify --json` as everywhere else. HF_TOKEN and
the hub settings go on the command's stdin, never in its argv or environment.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ops.remote import commands as rc
from ops.remote.executor import HostResults, run_each
from ops.remote.fanout import download_from, upload_staged
from ops.remote.hostmodels import HostModels, ModelsView, parse_report
from ops.remote.inventory import Host
from ops.remote.job import FleetJob
from ops.remote.shell import Shell, shell_factory
from ops.remote.wheelhouse import Wheelhouse, build_wheelhouse
from ops.settings import env_lines


def bootstrap(sh: Shell, wh: Wheelhouse) -> str:
    """Make sure the host's venv holds exactly this wheelhouse; a second run changes nothing."""
    plan = rc.bootstrap(sh.host, wh.wheels, wh.digest)
    if sh.run(plan.check, kind="query").exit_code == 0:
        return "unchanged"
    sh.run(plan.mkdir, what="create directories")
    for name in wh.wheels:
        sh.put(wh.directory / name, f"{plan.wheelhouse}/{name}")
    sh.run(plan.venv, what=f"create a venv with {sh.host.python} (is python3-venv installed?)")
    sh.run(plan.install, what="install the wheels")
    sh.run(plan.mark, what="record the installed version")
    return "installed"


def upload_lock(sh: Shell, lock_text: str) -> None:
    """The lock, written by a command that reads it on stdin: one exchange on the open connection, where SFTP took six."""
    sh.run(rc.write_file_argv(rc.lock_path(sh.host)), stdin=lock_text, what="upload the lock")


def host_model_command(sh: Shell, job: FleetJob, wh: Wheelhouse, token: str, *, seed: Path | None) -> HostModels:
    """Bootstrap, upload the lock (and fan-out files), run the model command; the host's report."""
    state = bootstrap(sh, wh)
    sh.say(f"bootstrap: {state}")
    upload_lock(sh, job.lock_text)
    if seed is not None and job.command == "fetch":
        for model in job.selected:
            verify = rc.model_argv(sh.host, "verify", models=[model.name])
            if sh.run(verify, stdin=env_lines(rc.model_env("verify", "")), kind="query").exit_code != 0:
                upload_staged(sh, model, seed)
    argv = rc.model_argv(sh.host, job.command, models=job.models, full=job.full)
    result = sh.run(argv, stdin=env_lines(rc.model_env(job.command, token)), kind="report", on_stderr_line=sh.say)
    return HostModels(state, parse_report(sh.host.name, result.stdout, result.stderr))


def run_with_ssh(hosts: Sequence[Host], job: FleetJob, *, seed: Path | None = None) -> HostResults[HostModels]:
    token, wh = os.environ.get("HF_TOKEN", ""), build_wheelhouse()
    return run_each(job.command, hosts, lambda sh: host_model_command(sh, job, wh, token, seed=seed),
                    shells=shell_factory(job.ssh, dry_run=job.dry_run), view=ModelsView(), rollout=job.rollout)


def copy_through_controller(source: Host, hosts: Sequence[Host], job: FleetJob) -> HostResults[HostModels]:
    """`source`'s verified files, downloaded here, then uploaded to each of `hosts`, which verify them fully (SFTP both ways)."""
    with tempfile.TemporaryDirectory(prefix="bakehouse-seed-") as tmp:
        if not job.dry_run:
            download_from(source, job, Path(tmp))
        return run_with_ssh(hosts, job, seed=Path(tmp))
