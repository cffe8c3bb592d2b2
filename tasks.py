"""bakehouse tasks (`invoke --list`). Each parses flags, calls one `ops` function, prints its report."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from invoke import Exit, task

from ops.errors import BakehouseError
from ops.models.cli import configure_logging, default_lock, parse_models, run_command
from ops.models.store import default_models_dir

MODEL_HELP = {
    "models": "comma-separated model names; 'all' for every model (default: models.toml's `default`)",
    "manifest": "models.toml path (default: $BAKEHOUSE_MANIFEST or ./models.toml)",
    "lock": "models.lock path (default: $BAKEHOUSE_LOCK or ./models.lock)",
    "dest": "store directory (default: $MODELS_DIR or ./models)",
    "json": "print one JSON document with per-model results",
    "workers": "parallel downloads / hashes (default 8)",
    "full": "re-hash every file instead of trusting the stamp",
    "hosts": "run on these inventory hosts over SSH (comma-separated) instead of locally",
    "group": "run on every host of this inventory group over SSH",
    "inventory": "Ansible-compatible inventory (default inventory/hosts.yml)",
    "parallel": "hosts at a time (default 8)",
    "host_keys": "strict (default: known_hosts must hold the key) or accept-new (record first-contact keys)",
    "connect_timeout": "SSH connect timeout in seconds (default 10)",
    "command_timeout": "seconds each remote command may run before its host fails (default: no limit)",
    "known_hosts": "known_hosts file checked for host keys (default ~/.ssh/known_hosts)",
    "from_local": "fan-out: fetch once on this machine (into --dest), then copy the verified files to every host",
    "from_host": "fan-out: fetch on this host first, then copy its verified files to the other hosts",
    "engine": "ssh (default: Fabric, from this process) or ansible (ansible-playbook, same inventory and steps)",
    "serial": "ansible engine: hosts per batch, a number or a percentage (default 100%)",
    "max_fail_percentage": "ansible engine: stop the play when more than this share of a batch failed (default 100)",
}


def _help(*names: str) -> dict[str, str]:
    return {n: MODEL_HELP[n] for n in names}


def _model_command(command: str, *, json: bool, **kwargs: object) -> None:
    configure_logging()
    paths = {k: Path(v) if v else None for k, v in kwargs.items() if k in ("manifest", "lock", "dest")}
    rest = {k: v for k, v in kwargs.items() if k not in paths}
    report = _or_exit(lambda: run_command(command, **paths, **rest))
    print(report.to_json() if json else report.render())
    if report.exit_code:
        raise Exit(code=report.exit_code)


@task(help=_help("models", "manifest", "lock", "json"))
def lock_models(c, models=None, manifest=None, lock=None, json=False):
    """Resolve revisions and write models.lock (commit + every file's size and sha256)."""
    _model_command("lock", models=models, manifest=manifest, lock=lock, json=json)


REMOTE = ("hosts", "group", "inventory", "parallel", "host_keys", "connect_timeout", "command_timeout", "known_hosts", "engine", "serial", "max_fail_percentage")


@task(help=_help("models", "manifest", "lock", "dest", "json", "workers", "from_local", "from_host", *REMOTE))
def fetch_models(c, models=None, manifest=None, lock=None, dest=None, json=False, workers=8, hosts=None, group=None, inventory=None, parallel=8, host_keys="strict", connect_timeout=10, command_timeout=None, known_hosts=None, from_local=False, from_host=None, engine="ssh", serial="100%", max_fail_percentage=100):
    """Download, fully verify and activate models: into the local store, or on many hosts over SSH."""
    if hosts or group:
        seed = (Path(dest) if dest else default_models_dir()) if from_local else None
        _fleet("fetch", models, lock, hosts, group, inventory, parallel, host_keys, (connect_timeout, command_timeout), known_hosts, json=json, seed=seed, from_host=from_host, engine=(engine, serial, int(max_fail_percentage)))
    else:
        _model_command("fetch", models=models, manifest=manifest, lock=lock, dest=dest, json=json, workers=int(workers))


@task(help=_help("models", "manifest", "lock", "dest", "full", "json", "workers", *REMOTE))
def verify_models(c, models=None, manifest=None, lock=None, dest=None, full=False, json=False, workers=8, hosts=None, group=None, inventory=None, parallel=8, host_keys="strict", connect_timeout=10, command_timeout=None, known_hosts=None, engine="ssh", serial="100%", max_fail_percentage=100):
    """Verify the store against models.lock (quick by default, --full re-hashes), locally or on hosts."""
    if hosts or group:
        _fleet("verify", models, lock, hosts, group, inventory, parallel, host_keys, (connect_timeout, command_timeout), known_hosts, json=json, full=full, engine=(engine, serial, int(max_fail_percentage)))
    else:
        _model_command("verify", models=models, manifest=manifest, lock=lock, dest=dest, full=full, json=json, workers=int(workers))


def _ssh_options(host_keys, timeouts, known_hosts):
    from ops.remote.ssh import SshOptions

    connect_timeout, command_timeout = timeouts
    return _or_exit(lambda: SshOptions(host_key_policy=host_keys, connect_timeout=float(connect_timeout), command_timeout=float(command_timeout) if command_timeout else None,
                                       **({"known_hosts": Path(known_hosts)} if known_hosts else {})))


def _fleet(command, models, lock, hosts, group, inventory, parallel, host_keys, timeouts, known_hosts, *, json, engine, full=False, seed=None, from_host=None):
    from ops.remote import fleet

    configure_logging()
    ssh = _ssh_options(host_keys, timeouts, known_hosts)
    job = fleet.FleetJob(command=command, lock=Path(lock) if lock else default_lock(), models=tuple(parse_models(models) or ()), full=full, parallel=int(parallel), ssh=ssh, seed=seed, from_host=from_host)
    name, serial, max_fail = engine
    results = _or_exit(lambda: fleet.run_fleet(job, Path(inventory or "inventory/hosts.yml"), hosts=parse_models(hosts), group=group, engine=name, serial=serial, max_fail_percentage=max_fail))
    print(fleet.render(command, results, as_json=json))
    if fleet.exit_code(results):
        raise Exit(code=fleet.exit_code(results))


def _proxies() -> dict[str, str]:
    """Proxy settings from the environment become build arguments (the first seed's http_proxy/https_proxy)."""
    return {k: os.environ[k] for k in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY") if os.environ.get(k)}


@task(
    help={
        "bake": "bake models into the image (default: the models with bake = true)",
        "models": "comma-separated models to bake (implies --bake)",
        "gpu": "CUDA/PyTorch base image instead of the slim CPU one",
        "engine": "docker or podman (default: docker when its engine answers, else podman)",
        "tag": "extra tag, e.g. registry.example.com/bakehouse:1.2",
        "base_image": "base image (default: $BAKEHOUSE_BASE_IMAGE, else python:3.11-slim; --gpu: a PyTorch CUDA image)",
        "torch_wheels": "folder of local wheels for torch (default: $PIP_FIND_LINKS when it is a folder)",
        "torch_index_url": "pip index for torch, e.g. https://download.pytorch.org/whl/cpu",
        "ca_bundle": "extra CA bundle for pip and the hub inside the build (corporate proxies)",
        "no_cache": "rebuild every layer (a clean build)",
        "dry_run": "print the build command instead of running it",
    }
)
def build(c, bake=False, models=None, gpu=False, engine=None, tag=None, base_image=None, torch_wheels=None, torch_index_url="", ca_bundle=None, no_cache=False, dry_run=False):
    """Build the image (multi-stage; --bake puts verified weights in their own cached layer)."""
    from ops.images.commands import BuildRequest
    from ops.images.commands import build as build_image

    configure_logging()
    wheels = torch_wheels or os.environ.get("PIP_FIND_LINKS", "")
    req = BuildRequest(
        context=Path.cwd(),
        bake=bool(bake or models),
        models=tuple(parse_models(models) or ()),
        gpu=gpu,
        engine=engine,
        tag=tag,
        base_image=base_image,
        torch_wheels=Path(wheels) if wheels and Path(wheels).is_dir() else None,
        torch_index_url=torch_index_url,
        ca_bundle=Path(ca_bundle) if ca_bundle else None,
        proxies=_proxies(),
        image_name=os.environ.get("BAKEHOUSE_IMAGE", "bakehouse"),
        no_cache=no_cache,
    )
    report = _or_exit(lambda: build_image(req, dry_run=dry_run))
    print(shlex.join(report.argv) if dry_run else report.render())


@task(help={"tag": "local image to push (default: the last one built)", "engine": "docker or podman", "dry_run": "print the commands instead of running them"})
def push(c, tag=None, engine=None, dry_run=False):
    """Push the image to $BAKEHOUSE_REGISTRY (password on stdin, never in argv)."""
    from ops.images.commands import push as push_image

    configure_logging()
    report = _or_exit(lambda: push_image(Path.cwd(), tag=tag, engine=engine, dry_run=dry_run))
    print("\n".join(shlex.join(a) for a in report.argv) if dry_run else report.render())


DEPLOY_HELP = {
    "hosts": "deploy to these inventory hosts (comma-separated)",
    "group": "deploy to every host of this inventory group",
    "inventory": "Ansible-compatible inventory (default inventory/hosts.yml)",
    "tag": "release version: the image tag on Docker hosts (default: the last build), the release name on bare hosts (default: the git revision)",
    "serial": "hosts at a time (default 1); a batch with a failed host stops the rollout",
    "dry_run": "print every command per host without connecting to any",
    "break_lock": "remove a deploy lock left by a deploy that died (the report says whose it was)",
    "json": "print one JSON document with a row per host",
    "host_keys": MODEL_HELP["host_keys"],
    "connect_timeout": MODEL_HELP["connect_timeout"],
    "command_timeout": MODEL_HELP["command_timeout"],
    "known_hosts": MODEL_HELP["known_hosts"],
    "lock": "models.lock shipped with bare-host releases (default ./models.lock)",
    "manifest": "models.toml shipped with bare-host releases (default ./models.toml)",
}


@task(help=DEPLOY_HELP)
def deploy(c, hosts=None, group=None, inventory=None, tag=None, serial=1, dry_run=False, break_lock=False, json=False, host_keys="strict", connect_timeout=10, command_timeout=None, known_hosts=None, lock=None, manifest=None):
    """Put a release on Docker, bare and webhook hosts, gated on /ready, rolled back when it fails."""
    _deploy("deploy", hosts, group, inventory, tag, serial, dry_run, break_lock, json, host_keys, (connect_timeout, command_timeout), known_hosts, lock, manifest)


@task(help={k: v for k, v in DEPLOY_HELP.items() if k not in ("tag", "lock", "manifest")})
def rollback(c, hosts=None, group=None, inventory=None, serial=1, dry_run=False, break_lock=False, json=False, host_keys="strict", connect_timeout=10, command_timeout=None, known_hosts=None):
    """Back to the previous release (bare) or image (Docker) on each host, gated on /ready."""
    _deploy("rollback", hosts, group, inventory, None, serial, dry_run, break_lock, json, host_keys, (connect_timeout, command_timeout), known_hosts, None, None)


def _deploy(command, hosts, group, inventory, tag, serial, dry_run, break_lock, json, host_keys, timeouts, known_hosts, lock, manifest):
    from ops.deploy import rollout

    configure_logging()
    ssh = _ssh_options(host_keys, timeouts, known_hosts)
    text, code = _or_exit(lambda: rollout.run(
        command, Path(inventory or "inventory/hosts.yml"), hosts=parse_models(hosts), group=group, project=Path(__file__).resolve().parent, tag=tag, serial=int(serial),
        ssh=ssh, dry_run_only=dry_run, break_lock=break_lock, as_json=json, manifest=Path(manifest or os.environ.get("BAKEHOUSE_MANIFEST") or "models.toml"), lock=Path(lock) if lock else default_lock(),
    ))
    print(text)
    if code:
        raise Exit(code=code)


def _or_exit(step):
    try:
        return step()
    except BakehouseError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None


@task(help={"model": "model to serve (default: $MODEL, else demo)", "port": "port to listen on (default: $PORT, else 8000)"})
def serve(c, model=None, port=None):
    """Run the app locally: quick verify (fetch if missing), then serve the OpenAI-compatible API."""
    from app.entrypoint import main

    code = main(model=model, port=int(port) if port else None)
    if code:
        raise Exit(code=code)


@task
def demo(c):
    """The whole path offline on the bundled demo model: local hub, lock, fetch, verify, serve, one completion."""
    from ops.demo import ROOT, run_demo

    configure_logging()
    code = run_demo(ROOT / ".demo")
    if code:
        raise Exit(code=code)


@task(help={"args": "extra pytest arguments, e.g. \"-k fetch -x\""})
def test(c, args=""):
    """Run the test suite (real servers on loopback)."""
    c.run(f"{sys.executable} -m pytest {args}", pty=False)
