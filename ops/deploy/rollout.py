"""Deploy or roll back across hosts: rolling batches, a deploy lock per host, one row per host.

`serial` hosts at a time; a batch with a failed host stops the rollout and the
hosts after it keep their release ("not attempted"). A host's failure is its
row, never another host's problem.
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from ops.deploy import common
from ops.deploy.release import build_release
from ops.deploy.steps import STEPS, Context, DeployCommand, Deployment
from ops.deploy.target import Target, target
from ops.errors import ConfigError, DeployLockedError, RemoteError, StepFailedError, error_fields, redact
from ops.images.actions import last_image
from ops.images.build import check_reference
from ops.images.registry import Registry
from ops.models.manifest import load_manifest
from ops.remote import commands as rc
from ops.remote.executor import HostResult, HostResults, Rollout, run_each
from ops.remote.inventory import Host
from ops.remote.job import FleetJob
from ops.remote.peers import run_with_peers
from ops.remote.shell import Shell, shell_factory
from ops.remote.ssh import SshOptions

DeployFanOut = Literal["peers"]
DEPLOY_FAN_OUT: tuple[DeployFanOut, ...] = ("peers",)


@dataclass(frozen=True)
class Plan:
    command: DeployCommand
    targets: tuple[Target, ...]
    context: Context
    ssh: SshOptions
    serial: int = 1
    break_lock: bool = False
    fan_out: DeployFanOut | None = None


def plan(command: DeployCommand, hosts: Sequence[Host], *, project: Path, tag: str | None, serial: int, ssh: SshOptions, break_lock: bool = False,
         manifest: Path | None = None, lock: Path | None = None, build_context: Path = Path(), fan_out: DeployFanOut | None = None) -> Plan:
    """Check everything that can be checked here (host variables, secrets, registry, release) before touching a host.

    `project` is the bakehouse checkout the release is built from; models.toml and models.lock default to it.
    `build_context` is where `invoke build` ran: without --tag, Docker hosts get the image it built last.
    """
    if serial < 1:
        raise ConfigError(f"--serial {serial}: deploy at least one host at a time.")
    manifest = manifest or project / "models.toml"
    default_model = (load_manifest(manifest).default or ["demo"])[0] if manifest.exists() else "demo"
    targets = tuple(target(h, default_model) for h in hosts)
    missing = sorted({s for t in targets for s in t.secrets if s not in os.environ} | {t.hook_url_env for t in targets if t.hook_url_env and t.hook_url_env not in os.environ})
    if missing:
        raise ConfigError(f"{', '.join(missing)} not set in this environment; the inventory names them as secrets or hook URLs. Export them and re-run.")
    runtimes = {t.host.runtime for t in targets}
    registry = Registry.from_env() if "docker" in runtimes else None
    release = build_release(project, tag=tag, manifest=manifest, lock=lock) if "bare" in runtimes and command == "deploy" else None
    if "docker" in runtimes and command == "deploy" and not tag:
        tag = last_image(build_context).rsplit(":", 1)[-1]
    if tag:
        check_reference("--tag", tag)
    context = Context(
        release=release,
        tag=tag,
        registry=registry,
        forwarded=rc.forwarded_env(),
        token=os.environ.get("HF_TOKEN", ""),
        secrets={s: os.environ[s] for t in targets for s in t.secrets},
    )
    return Plan(command, targets, context, ssh, serial, break_lock, fan_out if command == "deploy" else None)


def owner(command: str) -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')} ({command})"


def host_step(p: Plan) -> Callable[[Shell], Deployment]:
    """One host's whole command: its deploy lock around the runtime's steps (a webhook needs neither)."""
    targets = {t.name: t for t in p.targets}
    me = owner(p.command)

    def step(sh: Shell) -> Deployment:
        t = targets[sh.host.name]
        if t.host.runtime == "webhook":
            return webhook(p, t, sh)
        with deploy_lock(sh, t, me, break_lock=p.break_lock):
            return STEPS[(p.command, t.host.runtime)](sh, t, p.context)

    return step


class deploy_lock:  # noqa: N801 (used as a `with` statement, like contextlib's helpers)
    """The host's deploy lock: an atomic mkdir naming its owner; released only by its owner."""

    def __init__(self, sh: Shell, t: Target, me: str, *, break_lock: bool) -> None:
        self.sh, self.t, self.me, self.break_lock = sh, t, me, break_lock

    def __enter__(self) -> None:
        sh, t = self.sh, self.t
        if self.break_lock:
            held = sh.run(common.break_lock_argv(t.prefix), what="break the deploy lock").stdout.strip()
            if held:
                sh.say(f"broke the deploy lock held by {held}")
        try:
            taken = sh.run(common.lock_argv(t.prefix, self.me), what=f"take the deploy lock under {t.prefix}", allow=(common.LOCKED,))
        except StepFailedError as exc:
            raise RemoteError(f"could not take the deploy lock under {t.prefix}: {exc}", host=t.name, step="lock") from exc
        if taken.exit_code == common.LOCKED:
            holder = taken.stdout.strip()
            raise DeployLockedError(f"another deploy holds the lock: {holder}. Wait for it; if it is gone (crashed), re-run with --break-lock.",
                                    host=t.name, owner=holder)

    def __exit__(self, *exc: object) -> None:
        self.sh.run(common.unlock_argv(self.t.prefix, self.me), kind="query")


def webhook(p: Plan, t: Target, sh: Shell) -> Deployment:
    """POST the deploy hook (Render and the like); the URL is a secret, only its host is ever shown."""
    if p.command == "rollback":
        raise ConfigError("a deploy hook cannot roll back; use the service's own rollback (Render: the deploy list, Rollback).")
    return sh.local(f"POST ${t.hook_url_env}    # URL not shown", lambda: _post_hook(t), dry=Deployment(None, None, "triggered"))


def _post_hook(t: Target) -> Deployment:
    url = os.environ[t.hook_url_env]
    where = _host_of(url)
    try:
        r = httpx.post(url, timeout=30)
    except httpx.HTTPError as exc:
        raise RemoteError(f"the deploy hook at {where} did not answer ({type(exc).__name__}). Check {t.hook_url_env}.", host=t.name, step="webhook") from exc
    if r.is_success:
        return Deployment(None, _hook_id(r), "triggered")
    error = RemoteError(f"the deploy hook at {where} answered {r.status_code}: {redact(r.text[:200])}. Check {t.hook_url_env}.", host=t.name, step="webhook")
    return Deployment(None, None, "failed", error)


def _host_of(url: str) -> str:
    """Only the URL's host (and port) is ever shown: the path and any user:password in it are the secret."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or "the hook"
    except ValueError:
        return "the hook"


def _hook_id(r: httpx.Response) -> str | None:
    try:
        body = r.json()
    except ValueError:
        return None
    deploy = body.get("deploy", body) if isinstance(body, dict) else {}
    return str(deploy.get("id")) if isinstance(deploy, dict) and deploy.get("id") else None


def result_of(r: HostResult[Deployment]) -> str:
    if r.value is not None:
        return r.value.result
    if isinstance(r.error, DeployLockedError):
        return "locked"
    return "failed" if r.error is not None else "not attempted"


class DeployView:
    """host | runtime | old | new | result | time | held | drained; why each host failed, below.

    `held`: how long the front proxy held new requests (hold rollouts; blue-green holds none: "-"), the most a request waited
    for the switch. `drained`: how long the old instance took to finish its running requests and stop.
    """

    header: tuple[str, ...] = ("host", "runtime", "old", "new", "result", "time", "held", "drained")

    def rows(self, r: HostResult[Deployment]) -> list[tuple[str, ...]]:
        d = r.value
        held = "-" if d is None or d.held is None else f"{d.held:.1f}s"
        drained = "-" if d is None or d.drained is None else f"{d.drained:.1f}s"
        return [(r.host.name, r.host.runtime, (d and d.old) or "-", (d and d.new) or "-", result_of(r), f"{r.seconds:.1f}s", held, drained)]

    def reasons(self, r: HostResult[Deployment]) -> list[str]:
        error = r.error or (r.value.error if r.value is not None else None)
        return [f"{r.host.name}: {error}"] if error is not None else []

    def closing(self, results: HostResults[Deployment]) -> str:
        failed = len(results.failed)
        skipped = sum(not r.attempted for r in results)
        return f"{len(results)} host(s): {failed} failed, {skipped} not attempted" + (f" (exit {results.exit_code})" if failed else "")

    def fields(self, r: HostResult[Deployment]) -> dict[str, Any]:
        d = r.value
        if d is None:
            return {"old": None, "new": None, "result": result_of(r), "held": None, "drained": None}
        return d.to_dict() | (error_fields(d.error) if d.error else {})


def execute(p: Plan, *, dry_run: bool = False, say: Callable[[str, str], None] | None = None) -> HostResults[Deployment]:
    if p.fan_out == "peers":
        prefetch_with_peers(p, dry_run=dry_run)
    rollout = Rollout(parallel=p.serial, batch=p.serial, stop_after_failure=True)
    return run_each(p.command, [t.host for t in p.targets], host_step(p), shells=shell_factory(p.ssh, dry_run=dry_run), view=DeployView(),
                    rollout=rollout, say=say)


def prefetch_with_peers(p: Plan, *, dry_run: bool) -> None:
    """--fan-out peers: the release's models onto every bare host, host to host, before the rollout begins.

    The rollout's model step then finds them verified and fetches nothing; a host the
    prefetch failed on fetches for itself in that step (and fails there, old app serving).
    Its table goes to stderr: stdout stays the deploy's table (or JSON).
    """
    release = p.context.release
    by_model: dict[str, list[Host]] = {}
    for t in p.targets:
        if t.host.runtime == "bare":
            by_model.setdefault(t.model, []).append(t.host)
    if release is None or not by_model:
        return
    for model, hosts in by_model.items():
        job = FleetJob("fetch", lock=release.lock, models=(model,), ssh=p.ssh, dry_run=dry_run)
        results = run_with_peers(hosts, job)
        print(f"peer fan-out of {model} before the rollout:\n{results.render(dry_run=dry_run)}", file=sys.stderr)
