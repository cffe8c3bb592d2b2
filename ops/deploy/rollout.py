"""Deploy or roll back across hosts: rolling batches, a deploy lock per host, one row per host.

`serial` hosts at a time; a batch with a failed host stops the rollout and the
hosts after it keep their release ("not attempted"). A host's failure is its
row, never another host's problem.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from ops.deploy import common
from ops.deploy.release import build_release
from ops.deploy.shell import DryShell, SshShell
from ops.deploy.steps import Context, Outcome, deploy_bare, deploy_docker, rollback_bare, rollback_docker
from ops.deploy.target import Target, target
from ops.errors import EXIT_SOURCE, BakehouseError, ConfigError, DeployLockedError, redact
from ops.images.commands import last_image
from ops.images.registry import Registry
from ops.models.manifest import load_manifest
from ops.remote import commands as rc
from ops.remote.inventory import load_inventory
from ops.remote.ssh import SshOptions, connect

log = logging.getLogger("bakehouse.deploy")


@dataclass
class HostDeploy:
    host: str
    runtime: str
    old: str | None = None
    new: str | None = None
    result: str = "not attempted"
    seconds: float = 0.0
    error: str | None = None
    exit_code: int = 0
    downtime: float | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class Plan:
    command: str  # deploy | rollback
    targets: tuple[Target, ...]
    context: Context
    ssh: SshOptions
    serial: int = 1
    break_lock: bool = False


def plan(command: str, inventory: Path, *, hosts: list[str] | None, group: str | None, project: Path, tag: str | None,
         serial: int, ssh: SshOptions, break_lock: bool = False, manifest: Path | None = None, lock: Path | None = None, build_context: Path = Path()) -> Plan:
    """Check everything that can be checked here (inventory, secrets, registry, release) before touching a host.

    `project` is the bakehouse checkout the release is built from; models.toml and models.lock default to it.
    `build_context` is where `invoke build` ran: without --tag, Docker hosts get the image it built last.
    """
    if serial < 1:
        raise ConfigError(f"--serial {serial}: deploy at least one host at a time.")
    manifest = manifest or project / "models.toml"
    default_model = (load_manifest(manifest).default or ["demo"])[0] if manifest.exists() else "demo"
    targets = tuple(target(h, default_model) for h in load_inventory(inventory).select(hosts, group))
    missing = sorted({s for t in targets for s in t.secrets if s not in os.environ} | {t.hook_url_env for t in targets if t.hook_url_env and t.hook_url_env not in os.environ})
    if missing:
        raise ConfigError(f"{', '.join(missing)} not set in this environment; the inventory names them as secrets or hook URLs. Export them and re-run.")
    runtimes = {t.host.runtime for t in targets}
    registry = Registry.from_env() if "docker" in runtimes else None
    release = build_release(project, tag=tag, manifest=manifest, lock=lock) if "bare" in runtimes and command == "deploy" else None
    if "docker" in runtimes and command == "deploy" and not tag:
        tag = last_image(build_context).rsplit(":", 1)[-1]
    context = Context(
        release=release,
        tag=tag,
        registry=registry,
        forwarded={k: v for k, v in os.environ.items() if k in rc.FORWARDED_ENV},
        token=os.environ.get("HF_TOKEN", ""),
        secrets={s: os.environ[s] for t in targets for s in t.secrets},
    )
    return Plan(command, targets, context, ssh, serial, break_lock)


def execute(p: Plan, *, on_line: Callable[[str, str], None] | None = None) -> list[HostDeploy]:
    say = on_line or (lambda host, line: log.info("[%s] %s", host, line))
    results: list[HostDeploy] = []
    for i in range(0, len(p.targets), p.serial):
        batch = p.targets[i : i + p.serial]
        if any(not r.ok for r in results):
            results += [HostDeploy(t.name, t.host.runtime) for t in batch]
            continue
        with ThreadPoolExecutor(max_workers=len(batch), thread_name_prefix="deploy") as pool:
            results += list(pool.map(lambda t: _one(p, t, say), batch))
    return results


def _one(p: Plan, t: Target, say: Callable[[str, str], None]) -> HostDeploy:
    start = time.monotonic()
    row = HostDeploy(t.name, t.host.runtime)
    try:
        outcome = _webhook(p, t) if t.host.runtime == "webhook" else _over_ssh(p, t, lambda line: say(t.name, line))
        row = replace(row, old=outcome.old, new=outcome.new, result=outcome.result, error=outcome.error, exit_code=outcome.exit_code, downtime=outcome.downtime)
    except BakehouseError as exc:
        row = replace(row, result="failed" if not isinstance(exc, DeployLockedError) else "locked", error=redact(str(exc)), exit_code=exc.exit_code)
    except Exception as exc:  # noqa: BLE001  (an SSH connection dropped mid-step: this host's row, not everyone's crash)
        row = replace(row, result="failed", error=redact(f"{t.name}: {type(exc).__name__}: {exc}"), exit_code=EXIT_SOURCE)
    row.seconds = time.monotonic() - start
    say(t.name, row.result + (f": {row.error}" if row.error else ""))
    return row


def owner(command: str) -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')} ({command})"


def _over_ssh(p: Plan, t: Target, say: Callable[[str], None]) -> Outcome:
    conn = connect(t.host, p.ssh)
    try:
        sh = SshShell(conn, t.name, say, p.ssh.command_timeout)
        me = owner(p.command)
        if p.break_lock:
            held = sh.run(common.break_lock_argv(t.prefix), what="break the deploy lock").stdout.strip()
            if held:
                say(f"broke the deploy lock held by {held}")
        taken = sh.run(common.lock_argv(t.prefix, me), kind="query")
        if taken.exit_code == common.LOCKED:
            raise DeployLockedError(f"{t.name}: another deploy holds the lock: {taken.stdout.strip()}. Wait for it; if it is gone (crashed), re-run with --break-lock.")
        if taken.exit_code != 0:
            raise BakehouseError(f"{t.name}: could not take the deploy lock under {t.prefix}: {taken.stderr.strip()}")
        try:
            return _steps(p, t)(sh, t, p.context, say)
        finally:
            sh.run(common.unlock_argv(t.prefix, me), kind="query")
    finally:
        conn.close()


def _steps(p: Plan, t: Target) -> Callable[..., Outcome]:
    return {("deploy", "bare"): deploy_bare, ("deploy", "docker"): deploy_docker,
            ("rollback", "bare"): rollback_bare, ("rollback", "docker"): rollback_docker}[(p.command, t.host.runtime)]


def _webhook(p: Plan, t: Target) -> Outcome:
    """POST the deploy hook (Render and the like); the URL is a secret, only its host is ever shown."""
    if p.command == "rollback":
        raise ConfigError(f"{t.name}: a deploy hook cannot roll back; use the service's own rollback (Render: the deploy list, Rollback).")
    url = os.environ[t.hook_url_env]
    where = urlsplit(url).netloc or "the hook"
    try:
        r = httpx.post(url, timeout=30)
    except httpx.HTTPError as exc:
        raise BakehouseError(f"{t.name}: the deploy hook at {where} did not answer ({type(exc).__name__}). Check {t.hook_url_env}.") from None
    if r.is_success:
        return Outcome(None, _hook_id(r), "triggered")
    return Outcome(None, None, "failed", f"the deploy hook at {where} answered {r.status_code}: {redact(r.text[:200])}. Check {t.hook_url_env}.", EXIT_SOURCE)


def _hook_id(r: httpx.Response) -> str | None:
    try:
        body = r.json()
    except ValueError:
        return None
    deploy = body.get("deploy", body) if isinstance(body, dict) else {}
    return str(deploy.get("id")) if isinstance(deploy, dict) and deploy.get("id") else None


def dry_run(p: Plan) -> str:
    """Every command each host would run, in order, without connecting to any host."""
    out = []
    for t in p.targets:
        out.append(f"# {t.name} ({t.host.runtime}, {t.host.user}@{t.host.address}:{t.host.port})")
        if t.host.runtime == "webhook":
            out.append(f"POST ${t.hook_url_env}    # URL not shown" if p.command == "deploy" else "# a deploy hook cannot roll back: use the service's own rollback")
            continue
        sh = DryShell(t.name)
        me = owner(p.command)
        if p.break_lock:
            sh.run(common.break_lock_argv(t.prefix))
        sh.run(common.lock_argv(t.prefix, me))
        _steps(p, t)(sh, t, p.context, lambda line: None)
        sh.run(common.unlock_argv(t.prefix, me))
        out += sh.lines
    return "\n".join(out)


def exit_code(results: Sequence[HostDeploy]) -> int:
    return max((r.exit_code for r in results), default=0)


def render(command: str, results: Sequence[HostDeploy], *, as_json: bool) -> str:
    if as_json:
        return json.dumps({"command": command, "exit_code": exit_code(results), "hosts": [asdict(r) for r in results]}, indent=2)
    rows = [("host", "runtime", "old", "new", "result", "time", "down")]
    rows += [(r.host, r.runtime, r.old or "-", r.new or "-", r.result, f"{r.seconds:.1f}s", "-" if r.downtime is None else f"{r.downtime:.1f}s") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(7)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    failed = sum(not r.ok for r in results)
    skipped = sum(r.result == "not attempted" for r in results)
    lines.append(f"{len(results)} host(s): {failed} failed, {skipped} not attempted" + (f" (exit {exit_code(results)})" if failed else ""))
    return "\n".join(lines + [f"{r.host}: {r.error.removeprefix(f'{r.host}: ')}" for r in results if r.error])


def run(command: str, inventory: Path, *, hosts: list[str] | None, group: str | None, project: Path, tag: str | None = None, serial: int = 1,
        ssh: SshOptions | None = None, dry_run_only: bool = False, break_lock: bool = False, as_json: bool = False,
        manifest: Path | None = None, lock: Path | None = None) -> tuple[str, int]:
    """The whole command: plan, then print the plan (dry run) or execute it; (text, exit code)."""
    p = plan(command, inventory, hosts=hosts, group=group, project=project, tag=tag, serial=serial, ssh=ssh or SshOptions(),
             break_lock=break_lock, manifest=manifest, lock=lock)
    if dry_run_only:
        return dry_run(p), 0
    results = execute(p)
    return render(command, results, as_json=as_json), exit_code(results)

