"""One host's deploy or rollback, step by step, against a shell (SSH or dry-run).

Every app host runs a front proxy on its public port (ops.deploy.proxy) and
two app instances behind it, on loopback. A deploy puts the new release (bare
hosts) or image (Docker hosts) in the idle instance and moves the traffic
without failing a request, by the host's `rollout`:

    blue-green  start the new instance, wait for its /ready, then drain the old one
                (the proxy sends to whichever instances are ready)
    hold        drain the old instance (the proxy holds new requests: none is ready),
                start the new one, and the held requests go to it once it is ready

A new instance that never becomes ready is stopped, and the previous release
takes the traffic again: with blue-green it never lost it; with hold it is
started again and the held requests go to it. `invoke rollback` is a deploy of
the previous release, on the same path.
"""

from __future__ import annotations

import hashlib
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ops.deploy import bare, common, docker, proxy
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
    held: float | None = None  # hold: how long the proxy held new requests (the longest any request waited for the switch)
    drained: float | None = None  # how long the old instance took to finish its running requests and stop

    @property
    def exit_code(self) -> int:
        return self.error.exit_code if self.error else EXIT_OK

    def summary(self) -> str:
        return self.result + (f": {self.error}" if self.error else "")

    def to_dict(self) -> dict[str, Any]:
        return {"old": self.old, "new": self.new, "result": self.result, "held": self.held, "drained": self.drained}


@dataclass(frozen=True)
class Instance:
    port: int
    version: str  # a release (bare) or an image reference (Docker)


class Instances(Protocol):
    """How a host runs the app's instances: bare (systemd or the supervisor) or containers."""

    @property
    def t(self) -> Target: ...

    def start(self, sh: Shell, port: int, version: str) -> None: ...
    def stop(self, sh: Shell, port: int) -> None:
        """SIGTERM and wait: the instance drains (app.drain) before it exits."""
    def alive_argv(self, port: int) -> list[str]: ...
    def logs_argv(self, port: int) -> list[str]: ...


@dataclass(frozen=True)
class Switch:
    """How moving the traffic to a new instance went."""

    ready: bool  # the new instance serves
    restored: bool  # it did not, and the old one serves (it never stopped, or it came back)
    failure: NotReadyError | None = None  # why the new instance did not become ready (and, if so, why the old one did not come back)
    held: float | None = None
    drained: float | None = None


def switch(sh: Shell, inst: Instances, old: Instance | None, version: str) -> Switch:
    """Serve `version` from the idle instance instead of `old`, by the host's rollout; the old one is drained, or serves again if the new one fails."""
    t = inst.t
    idle = next(p for p in t.instance_ports if old is None or p != old.port)
    if old is None or t.rollout == "blue-green":
        return _blue_green(sh, inst, old, idle, version)
    return _hold(sh, inst, old, idle, version)


def _blue_green(sh: Shell, inst: Instances, old: Instance | None, idle: int, version: str) -> Switch:
    sh.say(f"starting {version} on port {idle}" + (f" beside {old.version} on port {old.port}" if old else ""))
    try:
        _start_ready(sh, inst, idle, version)
    except NotReadyError as exc:
        inst.stop(sh, idle)
        return Switch(ready=False, restored=old is not None, failure=exc)
    drained = _drain(sh, inst, old) if old else None
    return Switch(ready=True, restored=False, drained=drained)


def _hold(sh: Shell, inst: Instances, old: Instance, idle: int, version: str) -> Switch:
    sh.say(f"holding requests: draining {old.version} on port {old.port}, then starting {version} on port {idle}")
    held_from = time.monotonic()
    drained = _drain(sh, inst, old)
    try:
        _start_ready(sh, inst, idle, version)
        return Switch(ready=True, restored=False, held=time.monotonic() - held_from, drained=drained)
    except NotReadyError as exc:
        inst.stop(sh, idle)
        sh.say(f"{version} did not become ready; starting {old.version} again")
        try:
            _start_ready(sh, inst, old.port, old.version)
        except NotReadyError as again:
            reason = f"{exc.reason}; {old.version} did not come back either: {again.reason}"
            return Switch(ready=False, restored=False, failure=NotReadyError(reason, host=inst.t.name, reason=reason), held=None, drained=drained)
        return Switch(ready=False, restored=True, failure=exc, held=time.monotonic() - held_from, drained=drained)


def _start_ready(sh: Shell, inst: Instances, port: int, version: str) -> None:
    inst.start(sh, port, version)
    wait_ready(sh, inst.t, port, inst.alive_argv(port), inst.logs_argv(port))


def _drain(sh: Shell, inst: Instances, old: Instance) -> float:
    started = time.monotonic()
    inst.stop(sh, old.port)
    return time.monotonic() - started


def outcome(sw: Switch, old: str | None, new: str, *, done: Result, back: Result) -> Deployment:
    """The host's row: `done` when the new one serves, `back` when the old one does, else failed."""
    if sw.ready:
        return Deployment(old, new, done, held=sw.held, drained=sw.drained)
    return Deployment(old, new, back if sw.restored else "failed", sw.failure, held=sw.held, drained=sw.drained)


def active(sh: Shell, path: str, ports: tuple[int, int]) -> int | None:
    """The port the last deploy made active, if it is one of the host's instance ports."""
    text = sh.run(rc.read_argv(path), kind="query").stdout.strip()
    return int(text) if text.isdigit() and int(text) in ports else None


def proxy_digest(*texts: str) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


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
    """Fetch and verify the release's model before anything stops: a failed download leaves the old instance serving."""
    env = {**ctx.forwarded, **({"HF_TOKEN": ctx.token} if ctx.token else {})}
    result = sh.run(bare.fetch_argv(t, rel.version), stdin=env_lines(env), kind="report")
    failures = parse_report(t.name, result.stdout, result.stderr).failures()
    if failures:
        raise rebuild({**failures[0].to_dict(), **failures[0].details(), "message": f"fetching {t.model} failed: {failures[0]}"}) from failures[0]


def config_text(t: Target, version: str, ctx: Context) -> str:
    """The env file a release deployed now runs with: its settings and secrets."""
    return common.env_file({**bare.app_env(t, version), **ctx.secrets})


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
        write_config(sh, t, version, config_text(t, version, ctx))


@dataclass(frozen=True)
class BareInstances:
    t: Target

    def start(self, sh: Shell, port: int, version: str) -> None:
        t = self.t
        sh.run(bare.point_instance_argv(t, port, version), what=f"point the instance on port {port} at {version}")
        sh.run(rc.write_file_argv(bare.instance_env_path(t, port)), stdin=common.env_file(common.instance_env(t, port)), what="write the instance's settings")
        for argv in bare.start_argvs(t, port):
            sh.run(argv, what=f"start the instance on port {port}")

    def stop(self, sh: Shell, port: int) -> None:
        sh.run(bare.stop_argv(self.t, port), what=f"drain and stop the instance on port {port}")

    def alive_argv(self, port: int) -> list[str]:
        return bare.alive_argv(self.t, port)

    def logs_argv(self, port: int) -> list[str]:
        return bare.logs_argv(self.t, port)

    def running(self, sh: Shell) -> Instance | None:
        """The instance the last deploy made active, and the release it runs."""
        port = active(sh, bare.active_path(self.t), self.t.instance_ports)
        version = sh.run(bare.instance_version_argv(self.t, port), kind="query").stdout.strip() if port else ""
        return Instance(port, version) if port and version else None

    def activate(self, sh: Shell, port: int, version: str) -> None:
        t = self.t
        sh.run(rc.write_value_argv(bare.active_path(t), str(port)), what="record the active instance")
        sh.run(bare.switch_argv(t, version), what="switch current")
        sh.run(common.record_argv(t.prefix, version, bare.config_mark(t, version)), what="record the release")


def bare_proxy(sh: Shell, t: Target, rel_python: str, deps_digest: str) -> None:
    """The front proxy, installed and running with this host's configuration; restarted only when its binary or configuration changed."""
    d = proxy.proxy_dir(t)
    sh.run(rc.mkdir_argv(f"{d}/data"), what="create the proxy's directory")
    for argv in bare.retire_legacy_argvs(t):
        sh.run(argv, what="retire the app that ran on the public port before the front proxy")
    changed = sh.run(bare.install_proxy_argv(t, deps_digest), what="install the front proxy (Caddy)").stdout.strip() == "changed"
    config = proxy.config_text(t)
    unit = bare.proxy_unit_text(t) + bare.unit_text(t) if t.process_manager == "systemd" else bare.proxy_env(t)
    digest = proxy_digest(config, unit)
    if sh.run(rc.marked_argv(f"{d}/config.digest", digest), kind="query").exit_code != 0:
        sh.run(rc.write_file_argv(proxy.config_path(t), public=True), stdin=config, what="write the proxy's configuration")
        if t.process_manager == "systemd":
            sh.run(rc.write_file_argv(f"/etc/systemd/system/{bare.proxy_unit(t)}", public=True), stdin=bare.proxy_unit_text(t), what="write the proxy's unit")
            sh.run(rc.write_file_argv(bare.unit_path(t), public=True), stdin=bare.unit_text(t), what="write the instances' unit")
        else:
            sh.run(rc.write_file_argv(f"{d}/env"), stdin=bare.proxy_env(t), what="write the proxy's environment")
        changed = True
    for argv in bare.daemon_reload_argvs(t):
        sh.run(argv, what="reload systemd's units")
    if changed or sh.run(bare.proxy_alive_argv(t, rel_python), kind="query").exit_code != 0:
        for argv in bare.proxy_start_argvs(t, rel_python):
            sh.run(argv, what="start the front proxy")
        sh.run(rc.mark_argv(f"{d}/config.digest", digest), what="record the proxy's configuration")


def deploy_bare(sh: Shell, t: Target, ctx: Context) -> Deployment:
    rel = ctx.release
    assert rel is not None  # plan() builds one whenever a bare host is deployed
    config = config_text(t, rel.version, ctx)
    inst = BareInstances(t)
    old = inst.running(sh)
    install_release(sh, t, rel)
    bare_proxy(sh, t, bare.release_python(t, rel.version), rel.deps.digest)
    if old and old.version == rel.version and serving(sh, t, old.port, bare.alive_argv(t, old.port)) and _configured(sh, t, rel.version, config):
        return Deployment(old.version, rel.version, "unchanged")
    fetch_release_models(sh, t, rel, ctx)
    write_config(sh, t, rel.version, config)
    sw = switch(sh, inst, old, rel.version)
    if sw.ready:
        inst.activate(sh, _other(t, old), rel.version)
        _prune(sh, t, rel.version, old.version if old else None)
    return outcome(sw, old.version if old else None, rel.version, done="deployed", back="rolled back")


def rollback_bare(sh: Shell, t: Target, ctx: Context) -> Deployment:
    inst = BareInstances(t)
    old = inst.running(sh)
    current = old.version if old else None
    target = common.previous_version(sh.run(common.history_argv(t.prefix), kind="query").stdout, current)
    if target is None or sh.run(rc.exists_argv(f"{bare.release_dir(t, target)}/.complete"), kind="query").exit_code != 0:
        raise ConfigError(f"no previous release to roll back to (current: {current or 'none'}).")
    sh.say(f"rolling back {current} -> {target}")
    ensure_config(sh, t, target, ctx)
    sw = switch(sh, inst, old, target)
    if sw.ready:
        inst.activate(sh, _other(t, old), target)
    return outcome(sw, current, target, done="reverted", back="restored")


def _other(t: Target, old: Instance | None) -> int:
    """The instance a switch starts: the one that is not `old`'s (the first one on a new host)."""
    return next(p for p in t.instance_ports if old is None or p != old.port)


def _configured(sh: Shell, t: Target, version: str, config: str) -> bool:
    return sh.run(rc.marked_argv(bare.config_mark(t, version), config_digest(config)), kind="query").exit_code == 0


def _installed(sh: Shell, t: Target, rel: Release) -> bool:
    return sh.run(rc.marked_argv(f"{bare.release_dir(t, rel.version)}/.complete", release_identity(rel)), kind="query").exit_code == 0


def _prune(sh: Shell, t: Target, new: str, old: str | None) -> None:
    history = common.history_versions(sh.run(common.history_argv(t.prefix), kind="query").stdout)
    keep = list(dict.fromkeys([new, *([old] if old else []), *reversed(history)]))[: t.keep_releases]
    sh.run(bare.prune_argv(t, keep), what="prune old releases")


# --- docker hosts ------------------------------------------------------------

@dataclass(frozen=True)
class DockerInstances:
    t: Target
    ctx: Context

    def start(self, sh: Shell, port: int, version: str) -> None:
        t, ctx = self.t, self.ctx
        env = {**docker.app_env(t, ctx.forwarded), **({"HF_TOKEN": ctx.token} if ctx.token else {}), **ctx.secrets, **common.instance_env(t, port)}
        sh.run(rc.write_file_argv(docker.instance_env_path(t, port)), stdin=common.env_file(env), what="write the instance's env file")
        sh.run(docker.remove_argv(t, docker.instance(t, port)), what="clear a stopped container of this instance")
        sh.run(docker.run_argv(t, version, port), what=f"start {version} on port {port}")

    def stop(self, sh: Shell, port: int) -> None:
        sh.run(docker.stop_argv(self.t, port), what=f"drain and stop the instance on port {port}")

    def alive_argv(self, port: int) -> list[str]:
        return docker.alive_argv(self.t, port)

    def logs_argv(self, port: int) -> list[str]:
        return docker.logs_argv(self.t, port)

    def running(self, sh: Shell) -> Instance | None:
        """The instance the last deploy made active, and the image its container runs."""
        port = active(sh, docker.active_path(self.t), self.t.instance_ports)
        ref = sh.run(docker.running_image_argv(self.t, port), kind="query").stdout.strip() if port else ""
        return Instance(port, ref) if port and ref else None

    def activate(self, sh: Shell, port: int, ref: str) -> None:
        sh.run(rc.write_value_argv(docker.active_path(self.t), str(port)), what="record the active instance")
        sh.run(common.record_argv(self.t.prefix, ref), what="record the release")


def docker_proxy(sh: Shell, t: Target, ref: str) -> None:
    """The front proxy's container (Caddy from the app image), running with this host's configuration; recreated only when that changed."""
    d = proxy.proxy_dir(t)
    config = proxy.config_text(t)
    digest = proxy_digest(config, shlex.join(docker.proxy_run_argv(t, "IMAGE")))  # its flags, not the image: a new image does not restart it
    changed = sh.run(rc.marked_argv(f"{d}/config.digest", digest), kind="query").exit_code != 0
    if changed:
        sh.run(rc.write_file_argv(proxy.config_path(t), public=True), stdin=config, what="write the proxy's configuration")
    if changed or sh.run(docker.proxy_alive_argv(t), kind="query").exit_code != 0:
        for argv in docker.retire_legacy_argvs(t):
            sh.run(argv, what="retire the container that ran on the public port before the front proxy")
        sh.run(docker.proxy_remove_argv(t), what="remove the old proxy container")
        sh.run(docker.proxy_run_argv(t, ref), what="start the front proxy (Caddy)")
        sh.run(rc.mark_argv(f"{d}/config.digest", digest), what="record the proxy's configuration")


def deploy_docker(sh: Shell, t: Target, ctx: Context) -> Deployment:
    assert ctx.registry is not None and ctx.tag is not None  # plan() sets both whenever a Docker host is deployed
    ref = docker.image_ref(t, ctx.registry, ctx.tag)
    sh.run(docker.mkdir_argv(t), what="create directories")
    sh.run(rc.mkdir_argv(proxy.proxy_dir(t)), what="create the proxy's directory")
    inst = DockerInstances(t, ctx)
    old = inst.running(sh)
    _pull(sh, t, ctx, ref)
    docker_proxy(sh, t, ref)
    if old and old.version == ref and serving(sh, t, old.port, docker.alive_argv(t, old.port)):
        return Deployment(_tag(old.version), _tag(ref), "unchanged")
    check_gpus(sh, t)
    sw = switch(sh, inst, old, ref)
    if sw.ready:
        inst.activate(sh, _other(t, old), ref)
    return outcome(sw, _tag(old.version) if old else None, _tag(ref) or ref, done="deployed", back="rolled back")


def rollback_docker(sh: Shell, t: Target, ctx: Context) -> Deployment:
    inst = DockerInstances(t, ctx)
    old = inst.running(sh)
    current = old.version if old else None
    target = common.previous_version(sh.run(common.history_argv(t.prefix), kind="query").stdout, current)
    if target is None:
        raise ConfigError(f"no previous image to roll back to (current: {current or 'none'}).")
    if sh.run(docker.image_present_argv(t, target), kind="query").exit_code != 0:
        _pull(sh, t, ctx, target)
    sh.say(f"rolling back {current} -> {target}")
    check_gpus(sh, t)
    sw = switch(sh, inst, old, target)
    if sw.ready:
        inst.activate(sh, _other(t, old), target)
    return outcome(sw, _tag(current), _tag(target) or target, done="reverted", back="restored")


def check_gpus(sh: Shell, t: Target) -> None:
    """Before anything stops: a host asked for GPUs must be able to give them to a container."""
    argv = docker.gpu_check_argv(t)
    if argv is not None and sh.run(argv, kind="query").exit_code != 0:
        need = ("the NVIDIA Container Toolkit with Docker's nvidia runtime (`nvidia-ctk runtime configure --runtime=docker`, then restart dockerd)"
                if t.engine == "docker" else "a CDI spec for the GPUs (`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`)")
        raise StepFailedError(f"gpus is {t.gpus!r} but the host cannot give GPUs to a container: nvidia-smi must answer, and {t.engine} needs {need}. "
                              "Install the NVIDIA driver and toolkit there, or set gpus to \"\" for a CPU host.", host=t.name, step="gpu check")


def _pull(sh: Shell, t: Target, ctx: Context, ref: str) -> None:
    assert ctx.registry is not None
    if ctx.registry.user:
        sh.run(docker.login_argv(t, ctx.registry), stdin=ctx.registry.password + "\n", what=f"log in to {ctx.registry.host}")
    sh.run(docker.pull_argv(t, ctx.registry, ref), what=f"pull {ref}")


def _tag(ref: str | None) -> str | None:
    return ref.rsplit(":", 1)[-1] if ref and ":" in ref.rsplit("/", 1)[-1] else ref


STEPS: dict[tuple[DeployCommand, str], Callable[[Shell, Target, Context], Deployment]] = {
    ("deploy", "bare"): deploy_bare,
    ("deploy", "docker"): deploy_docker,
    ("rollback", "bare"): rollback_bare,
    ("rollback", "docker"): rollback_docker,
}
