"""`--engine ansible`: the fleet steps through ansible-playbook against the same inventory.

Python plans every host's argv (the same builders as the SSH engine) into an
extra-vars file (0600, removed afterwards: it holds the HF token); the shipped
playbook only executes them. Each host's JSON report comes back to the control
machine, so the result table is the same as the SSH engine's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ops.errors import BakehouseError, CommandError, ConfigError, HostUnreachableError, NoReportError, RemoteTimeoutError
from ops.remote import commands as rc
from ops.remote.executor import HostResult, HostResults
from ops.remote.hostmodels import HostModels, ModelsView, parse_report
from ops.remote.inventory import Host
from ops.remote.job import FleetJob
from ops.remote.wheelhouse import Wheelhouse, build_wheelhouse
from ops.runner import run_streaming
from ops.settings import env_flag, env_lines

PLAYBOOK = Path(__file__).with_name("models-playbook.yml")
TRUST_ENV = "BAKEHOUSE_TRUST_INVENTORY"
# Variables with which ansible-playbook runs a command of the inventory's choosing on this machine (ProxyCommand in ssh's
# arguments, another ssh, a local connection) or runs something else than what bakehouse planned on the host.
_COMMAND_VARS = re.compile(r"ansible_(ssh_common_args|ssh_extra_args|sftp_extra_args|scp_extra_args|ssh_args|ssh_executable|shell_executable|"
                           r"become_exe|become_flags|paramiko_proxy_command|executable|.*_interpreter|connection)\Z")
_PLAIN_PROGRAM = re.compile(r"[A-Za-z0-9/][A-Za-z0-9/._+-]*\Z")
_CONNECTIONS = ("ssh", "paramiko", "smart")


def check_trusted(hosts: Sequence[Host], inventory: Path) -> None:
    """Refuse an inventory that could make ansible-playbook run commands of its own, unless BAKEHOUSE_TRUST_INVENTORY=1 says it is trusted.

    The SSH engine reads only the variables it knows; ansible-playbook honours all of them, and reads host_vars/ and
    group_vars/ beside the inventory, and runs an executable inventory file as a script.
    """
    if env_flag(TRUST_ENV, False):
        return
    hint = f"If this inventory is yours, set {TRUST_ENV}=1; else use the ssh engine (the default), which reads only the variables it knows."
    if os.access(inventory, os.X_OK) or any((inventory.parent / d).exists() for d in ("host_vars", "group_vars")):
        raise ConfigError(f"{inventory}: an executable inventory, or host_vars/ or group_vars/ beside it: ansible-playbook would run or read what "
                          f"bakehouse has not checked. {hint}")
    for host in hosts:
        for var, value in host.vars.items():
            if not _COMMAND_VARS.match(str(var)):
                continue
            plain = (var.endswith("_interpreter") and isinstance(value, str) and _PLAIN_PROGRAM.match(value)) or \
                (var == "ansible_connection" and value in _CONNECTIONS)
            if not plain:
                raise ConfigError(f"{host.name}: {var} makes ansible-playbook run a command of the inventory's choosing ({str(value)[:80]!r}). {hint}")


def host_plan(host: Host, job: FleetJob, wh: Wheelhouse) -> dict[str, list[str] | str]:
    """The SSH engine's bootstrap and model command for one host, as the playbook's variables."""
    boot = rc.bootstrap(host, wh.wheels, wh.digest)
    return {
        "check_marker": boot.check,
        "mkdir": boot.mkdir,
        "wheelhouse": boot.wheelhouse,
        "venv": boot.venv,
        "install": boot.install,
        "touch_marker": boot.mark,
        "lock": rc.lock_path(host),
        "command": rc.model_argv(host, job.command, models=job.models, full=job.full),
    }


def ansible_playbook() -> str | None:
    """On PATH, or installed beside this interpreter (a venv that is not activated)."""
    beside = Path(sys.executable).with_name("ansible-playbook")
    return shutil.which("ansible-playbook") or (str(beside) if beside.exists() else None)


def playbook_argv(inventory: Path, vars_file: Path, *, forks: int, program: str = "ansible-playbook") -> list[str]:
    return [program, "-i", str(inventory), str(PLAYBOOK), "-e", f"@{vars_file}", "--forks", str(forks)]


def ansible_env(job: FleetJob) -> dict[str, str]:
    """Host keys checked against the same known_hosts, with the same policy and timeouts as the SSH engine."""
    strict = "accept-new" if job.ssh.host_key_policy == "accept-new" else "yes"
    env = {
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_SSH_ARGS": f"-o UserKnownHostsFile={job.ssh.known_hosts} -o StrictHostKeyChecking={strict} -o ConnectTimeout={int(job.ssh.connect_timeout)}",
        "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
    }
    if job.ssh.command_timeout:
        env["ANSIBLE_TASK_TIMEOUT"] = str(max(1, round(job.ssh.command_timeout)))  # per task, as --command-timeout is per command
    return env


def run_with_ansible(hosts: Sequence[Host], job: FleetJob, inventory: Path) -> HostResults[HostModels]:
    check_trusted(hosts, inventory)
    program = ansible_playbook()
    if program is None:
        raise ConfigError("--engine ansible needs ansible-playbook: pip install 'bakehouse[ansible]' (ansible-core).")
    wh = build_wheelhouse()
    token = os.environ.get("HF_TOKEN", "") if job.command == "fetch" else ""
    with tempfile.TemporaryDirectory(prefix="bakehouse-ansible-") as tmp:
        results_dir, vars_file = Path(tmp) / "results", Path(tmp) / "vars.json"
        results_dir.mkdir()
        extra = {
            "bakehouse_hosts": ",".join(h.name for h in hosts),
            "bakehouse_plan": {h.name: host_plan(h, job, wh) for h in hosts},
            "bakehouse_wheelhouse": str(wh.directory),
            "bakehouse_wheels": list(wh.wheels),
            "bakehouse_lock": str(job.lock.resolve()),
            "bakehouse_results": str(results_dir),
            "bakehouse_stdin": env_lines(rc.model_env(job.command, token)),
            "bakehouse_serial": job.ansible.serial,
            "bakehouse_max_fail_percentage": job.ansible.max_fail_percentage,
        }
        fd = os.open(vars_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(extra, f)
        try:
            run_streaming(playbook_argv(inventory, vars_file, forks=job.rollout.parallel, program=program), env=ansible_env(job))
            failure = ""
        except CommandError as exc:
            failure = exc.stderr
        return HostResults(job.command, [_result(h, results_dir / f"{h.name}.json", failure) for h in hosts], ModelsView())


def _result(host: Host, report: Path, output: str) -> HostResult[HostModels]:
    """A host's row: its report when the playbook brought one back, else Ansible's own reason."""
    try:
        if report.exists():
            return HostResult(host, HostModels("", parse_report(host.name, report.read_text(), "")))
        raise _failure(host, output)
    except BakehouseError as exc:
        return HostResult(host, error=exc)


def _failure(host: Host, output: str) -> BakehouseError:
    lines = [ln.strip() for ln in output.splitlines()]
    at = next((i for i, ln in enumerate(lines) if f"[{host.name}]" in ln and ln.startswith(("fatal:", "failed:"))), None)
    if at is None:
        return NoReportError("no report: see the ansible output above", host=host.name, step="ansible-playbook")
    why = _reason(lines, at)
    if "UNREACHABLE" in lines[at]:
        return HostUnreachableError(f"UNREACHABLE: {why}"[:300], host=host.name, step="ansible-playbook")
    if "Timed out" in why:
        return RemoteTimeoutError(why[:300], host=host.name, step="model command")
    return NoReportError(why[:300], host=host.name, step="model command")


def _reason(lines: list[str], at: int) -> str:
    """Ansible's own reason for the failure on line `at`: its JSON `msg`, else the `[ERROR]:` block printed just before it.

    The model command's task is `no_log` (the token is on its stdin), so its result's msg is censored; the
    `[ERROR]: Task failed: Timed out …` line Ansible prints above the result is not.
    """
    try:
        msg = json.loads(lines[at].split("=>", 1)[1]).get("msg")
    except (IndexError, ValueError, AttributeError):
        msg = None
    if msg:
        return str(msg)
    for line in reversed(lines[:at]):
        if line.startswith("[ERROR]:"):
            return line.removeprefix("[ERROR]:").strip()
        if line.startswith(("TASK [", "ok:", "changed:", "fatal:", "failed:", "skipping:")):
            break
    return lines[at]
