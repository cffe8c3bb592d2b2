"""One host's deploy or rollback, step by step, against a shell (SSH or dry-run).

Kamal's boot loop, adapted to GPU hosts: a GPU rarely holds two copies of a
model, so the old app stops before the new one starts; the new one must answer
/ready within `ready_timeout` (failing fast when it crashes), or the previous
release or container is put back and must answer /ready in its turn.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ops.deploy import bare, common, docker
from ops.deploy.gate import serving, wait_ready
from ops.deploy.release import Release
from ops.deploy.target import Target
from ops.errors import EXIT_OK, BakehouseError, ConfigError, NotReadyError, StepFailedError, rebuild
from ops.images.registry import Registry
from ops.remote import commands as rc
from ops.remote.hostmodels import parse_report
from ops.remote.shell import Shell
from ops.remote.wheelhouse import wheel_identity
from ops.settings import env_lines

DeployCommand = Literal["deploy", "rollback"]
Result = Literal["deployed", "unchanged", "rolled back", "reverted", "restored", "failed", "triggered"]


@dataclass(frozen=True)
class Context:
    """What every host's steps share: the release or image tag, credentials, the environment to forward."""

    release: Release | None = None  # bare hosts
    tag: str | None = None  # docker hosts
    registry: Registry | None = None
    forwarded: Mapping[str, str] = field(default_factory=dict)  # HF_ENDPOINT, … for fetches and containers
    token: str = ""
    secrets: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Deployment:
    """What a deploy or rollback did on one host."""

    old: str | None
    new: str | None
    result: Result
    error: BakehouseError | None = None  # why it was rolled back or failed
    downtime: float | None = None  # from stopping the old app to /ready of the new (or of the old, put back)

    @property
    def exit_code(self) -> int:
        return self.error.exit_code if self.error else EXIT_OK

    def summary(self) -> str:
        return self.result + (f": {self.error}" if self.error else "")

    def to_dict(self) -> dict[str, Any]:
        return {"old": self.old, "new": self.new, "result": self.result, "downtime": self.downtime}


def _down_since(d: Deployment, since: float) -> Deployment:
    d.downtime = time.monotonic() - since
    return d


# --- bare hosts --------------------------------------------------------------

def release_identity(rel: Release) -> str:
    """What makes two releases of the same version name the same: code, deps and lock."""
    h = hashlib.sha256(wheel_identity(rel.wheel) + rel.deps.digest.encode() + rel.lock.read_bytes() + rel.manifest.read_bytes())
    return h.hexdigest()[:16]


def install_release(sh: Shell, t: Target, rel: Release) -> None:
    """Deps venv once per digest, then the release venv; both marked complete only at the end (a crash re-does them)."""
    wheels, deps = f"{t.prefix}/wheels", bare.deps_dir(t, rel.deps.digest)
    sh.run(rc.mkdir_argv(wheels, f"{t.prefix}/releases", f"{t.prefix}/deps", t.host.models_dir), what="create directories")
    if t.app_deps == "wheelhouse" and sh.run(rc.exists_argv(f"{deps}/.complete"), kind="query").exit_code != 0:
        sent = _upload(sh, [rel.deps.directory / w for w in rel.deps.wheels], wheels)
        sh.say(f"dependencies {rel.deps.digest}: uploaded {sent} wheel(s), installing")
        sh.run(rc.discard_argv(deps), what="clear a partial deps venv")
        sh.run(rc.venv_argv(t.host.python, deps), what=f"create a venv with {t.host.python} (is python3-venv installed?)")
        sh.run(rc.pip_install_argv(rc.venv_python(deps), [f"{wheels}/{w}" for w in rel.deps.wheels]), what="install the dependencies")
        sh.run(rc.mark_argv(f"{deps}/.complete"), what="mark the deps venv complete")
    if _installed(sh, t, rel):
        sh.say(f"release {rel.version}: already installed")
        return
    root = bare.release_dir(t, rel.version)
    sh.run(rc.discard_argv(root), what="clear a partial release")
    sh.run(rc.mkdir_argv(root), what="create the release directory")
    # The project's wheel keeps its name from release to release: it goes into the release, never the shared wheels/.
    sh.put(rel.wheel, f"{root}/{rel.wheel.name}")
    sh.run(rc.venv_argv(t.host.python, f"{root}/venv", system_site_packages=t.app_deps == "system"), what=f"create a venv with {t.host.python}")
    sh.run(rc.pip_install_argv(bare.release_python(t, rel.version), [f"{root}/{rel.wheel.name}"]), what="install the release")
    if t.app_deps == "wheelhouse":
        sh.run(bare.link_deps_argv(t, rel.version, rel.deps.digest), what="link the release to its deps")
        sh.run(rc.mark_argv(f"{root}/deps", rel.deps.digest + "\n"), what="record the release's deps")
    sh.put(rel.manifest, f"{root}/models.toml")
    sh.put(rel.lock, f"{root}/models.lock")
    sh.run(rc.mark_argv(f"{root}/.complete", release_identity(rel)), what="mark the release complete")
    sh.say(f"release {rel.version}: installed")


def _upload(sh: Shell, files: list[Path], directory: str) -> int:
    """Upload files a host lacks (same name and size counts as present: dependency wheels are immutable by name and version)."""
    sent = 0
    for path in files:
        if sh.size(f"{directory}/{path.name}") != path.stat().st_size:
            sh.put(path, f"{directory}/{path.name}")
            sent += 1
    return sent


def fetch_release_models(sh: Shell, t: Target, rel: Release, ctx: Context) -> None:
    """Fetch and verify the release's model before anything stops: a failed download leaves the old app serving."""
    env = {**ctx.forwarded, **({"HF_TOKEN": ctx.token} if ctx.token else {})}
    result = sh.run(bare.fetch_argv(t, rel.version), stdin=env_lines(env), kind="report")
    failures = parse_report(t.name, result.stdout, result.stderr).failures()
    if failures:
        raise rebuild({**failures[0].to_dict(), "message": f"fetching {t.model} failed: {failures[0]}"}) from failures[0]


def config_text(t: Target, ctx: Context) -> str:
    """The env file a release deployed now runs with: its settings and secrets."""
    return common.env_file({**bare.app_env(t), **ctx.secrets})


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_config(sh: Shell, t: Target, version: str, text: str) -> None:
    """The release's own env file (0600) and its digest: written into the release, so no other release's start can change it."""
    sh.run(rc.write_file_argv(bare.env_path(t, version)), stdin=text, what="write the release's env file")
    sh.run(rc.mark_argv(bare.config_mark(t, version), config_digest(text)), what="record the configuration's digest")


def ensure_config(sh: Shell, t: Target, version: str, ctx: Context) -> None:
    """A release installed before configurations belonged to releases has none: it gets today's, once."""
    if sh.run(rc.exists_argv(bare.env_path(t, version)), kind="query").exit_code != 0:
        sh.say(f"{version} has no configuration of its own; writing the current settings into it")
        write_config(sh, t, version, config_text(t, ctx))


def start_bare(sh: Shell, t: Target, version: str) -> tuple[str | None, float]:
    """Switch `current` (and with it the configuration), restart, wait for /ready: (None when ready, else why not; when the old app was stopped)."""
    if t.process_manager == "systemd":
        sh.run(rc.write_file_argv(bare.unit_path(t)), stdin=bare.unit_text(t), what="write the systemd unit")
    sh.run(bare.switch_argv(t, version), what="switch current")
    stopped = time.monotonic()
    for argv in bare.restart_argvs(t):
        sh.run(argv, what="restart the app")
    return wait_ready(sh, t, bare.alive_argv(t), bare.logs_argv(t)), stopped


def deploy_bare(sh: Shell, t: Target, ctx: Context) -> Deployment:
    rel = ctx.release
    assert rel is not None  # plan() builds one whenever a bare host is deployed
    config = config_text(t, ctx)
    old = sh.run(bare.current_argv(t), kind="query").stdout.strip() or None
    if old == rel.version and serving(sh, t, bare.alive_argv(t)) and _installed(sh, t, rel) and _configured(sh, t, rel.version, config):
        return Deployment(old, rel.version, "unchanged")
    install_release(sh, t, rel)
    fetch_release_models(sh, t, rel, ctx)
    write_config(sh, t, rel.version, config)
    sh.say(f"starting {rel.version}" + (f" in place of {old}" if old else ""))
    why, since = start_bare(sh, t, rel.version)
    if why is None:
        done = _down_since(Deployment(old, rel.version, "deployed"), since)
        sh.run(common.record_argv(t.prefix, rel.version, bare.config_mark(t, rel.version)), what="record the release")
        _prune(sh, t, rel.version, old)
        return done

    def restore(version: str) -> str | None:
        ensure_config(sh, t, version, ctx)
        return start_bare(sh, t, version)[0]

    return _down_since(fall_back(sh, t, old, rel.version, why, restore, lambda: sh.run(bare.stop_argv(t), kind="query")), since)


def rollback_bare(sh: Shell, t: Target, ctx: Context) -> Deployment:
    current = sh.run(bare.current_argv(t), kind="query").stdout.strip() or None
    target = common.previous_version(sh.run(common.history_argv(t.prefix), kind="query").stdout, current)
    if target is None or sh.run(rc.exists_argv(f"{bare.release_dir(t, target)}/.complete"), kind="query").exit_code != 0:
        raise ConfigError(f"no previous release to roll back to (current: {current or 'none'}).")
    sh.say(f"rolling back {current} -> {target}")
    ensure_config(sh, t, target, ctx)
    why, since = start_bare(sh, t, target)
    if why is None:
        done = _down_since(Deployment(current, target, "reverted"), since)
        sh.run(common.record_argv(t.prefix, target, bare.config_mark(t, target)), what="record the release")
        return done
    return _down_since(fall_back(sh, t, current, target, why, lambda v: start_bare(sh, t, v)[0], lambda: None, back="restored"), since)


def _configured(sh: Shell, t: Target, version: str, config: str) -> bool:
    return sh.run(rc.marked_argv(bare.config_mark(t, version), config_digest(config)), kind="query").exit_code == 0


def _installed(sh: Shell, t: Target, rel: Release) -> bool:
    return sh.run(rc.marked_argv(f"{bare.release_dir(t, rel.version)}/.complete", release_identity(rel)), kind="query").exit_code == 0


def _prune(sh: Shell, t: Target, new: str, old: str | None) -> None:
    history = common.history_versions(sh.run(common.history_argv(t.prefix), kind="query").stdout)
    keep = list(dict.fromkeys([new, *([old] if old else []), *reversed(history)]))[: t.keep_releases]
    sh.run(bare.prune_argv(t, keep), what="prune old releases")


# --- docker hosts ------------------------------------------------------------

def start_docker(sh: Shell, t: Target, ref: str, ctx: Context) -> tuple[str | None, float]:
    """Write the env file, set the serving container aside, run the new one, wait for /ready."""
    env = {**docker.app_env(t, ctx.forwarded), **({"HF_TOKEN": ctx.token} if ctx.token else {}), **ctx.secrets}
    sh.run(rc.write_file_argv(docker.env_path(t)), stdin=common.env_file(env), what="write the env file")
    stopped = time.monotonic()
    for argv in docker.retire_argvs(t):
        sh.run(argv, what="stop the serving container")
    sh.run(docker.run_argv(t, ref), what=f"start {ref}")
    return wait_ready(sh, t, docker.alive_argv(t), docker.logs_argv(t)), stopped


def deploy_docker(sh: Shell, t: Target, ctx: Context) -> Deployment:
    assert ctx.registry is not None and ctx.tag is not None  # plan() sets both whenever a Docker host is deployed
    ref = docker.image_ref(t, ctx.registry, ctx.tag)
    old = sh.run(docker.running_image_argv(t), kind="query").stdout.strip() or None
    sh.run(docker.mkdir_argv(t), what="create directories")
    _pull(sh, t, ctx, ref)
    if old == ref and serving(sh, t, docker.alive_argv(t)):
        return Deployment(_tag(old), _tag(ref), "unchanged")
    sh.say(f"starting {ref}" + (f" in place of {old}" if old else ""))
    return _swap_container(sh, t, ctx, old, ref, done="deployed", back="rolled back")


def rollback_docker(sh: Shell, t: Target, ctx: Context) -> Deployment:
    current = sh.run(docker.running_image_argv(t), kind="query").stdout.strip() or None
    target = common.previous_version(sh.run(common.history_argv(t.prefix), kind="query").stdout, current)
    if target is None:
        raise ConfigError(f"no previous image to roll back to (current: {current or 'none'}).")
    if sh.run(docker.image_present_argv(t, target), kind="query").exit_code != 0:
        _pull(sh, t, ctx, target)
    sh.say(f"rolling back {current} -> {target}")
    return _swap_container(sh, t, ctx, current, target, done="reverted", back="restored")


def check_gpus(sh: Shell, t: Target) -> None:
    """Before anything stops: a host asked for GPUs must be able to give them to a container."""
    argv = docker.gpu_check_argv(t)
    if argv is not None and sh.run(argv, kind="query").exit_code != 0:
        need = ("the NVIDIA Container Toolkit with Docker's nvidia runtime (`nvidia-ctk runtime configure --runtime=docker`, then restart dockerd)"
                if t.engine == "docker" else "a CDI spec for the GPUs (`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`)")
        raise StepFailedError(f"gpus is {t.gpus!r} but the host cannot give GPUs to a container: nvidia-smi must answer, and {t.engine} needs {need}. "
                              "Install the NVIDIA driver and toolkit there, or set gpus to \"\" for a CPU host.", host=t.name, step="gpu check")


def _swap_container(sh: Shell, t: Target, ctx: Context, old: str | None, ref: str, *, done: Result, back: Result) -> Deployment:
    """Start `ref` in place of the serving container; keep it if ready, else put the old one back."""
    check_gpus(sh, t)
    why, since = start_docker(sh, t, ref, ctx)
    if why is None:
        d = _down_since(Deployment(_tag(old), _tag(ref), done), since)
        sh.run(docker.remove_argv(t, docker.previous(t)), what="remove the previous container")
        sh.run(common.record_argv(t.prefix, ref), what="record the release")
        return d
    d = fall_back(sh, t, _tag(old), _tag(ref), why, lambda _: _restore_container(sh, t), lambda: sh.run(docker.remove_argv(t, t.container), kind="query"), back=back)
    return _down_since(d, since)


def _pull(sh: Shell, t: Target, ctx: Context, ref: str) -> None:
    assert ctx.registry is not None
    if ctx.registry.user:
        sh.run(docker.login_argv(t, ctx.registry), stdin=ctx.registry.password + "\n", what=f"log in to {ctx.registry.host}")
    sh.run(docker.pull_argv(t, ctx.registry, ref), what=f"pull {ref}")


def _restore_container(sh: Shell, t: Target) -> str | None:
    for argv in docker.restore_argvs(t):
        sh.run(argv, what="restore the previous container")
    return wait_ready(sh, t, docker.alive_argv(t), docker.logs_argv(t))


def _tag(ref: str | None) -> str | None:
    return ref.rsplit(":", 1)[-1] if ref and ":" in ref.rsplit("/", 1)[-1] else ref


# --- both --------------------------------------------------------------------

def fall_back(sh: Shell, t: Target, old: str | None, new: str | None, why: str, restore: Callable[[str], str | None], discard: Callable[[], object],
              back: Result = "rolled back") -> Deployment:
    """The new release never became ready: put the old one back (it must become ready too), or stop the new one when there is none."""
    sh.say(f"{new} did not become ready: {why}")
    if old is None:
        discard()
        return Deployment(None, new, "failed", NotReadyError(f"{why}", host=t.name, reason=why))
    sh.say(f"switching back to {old}")
    again = restore(old)
    if again is None:
        return Deployment(old, new, back, NotReadyError(f"{why}", host=t.name, reason=why))
    reason = f"{why}; {old} did not come back either: {again}"
    return Deployment(old, new, "failed", NotReadyError(f"{reason}", host=t.name, reason=reason))


STEPS: dict[tuple[DeployCommand, str], Callable[[Shell, Target, Context], Deployment]] = {
    ("deploy", "bare"): deploy_bare,
    ("deploy", "docker"): deploy_docker,
    ("rollback", "bare"): rollback_bare,
    ("rollback", "docker"): rollback_docker,
}
