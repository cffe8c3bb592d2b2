"""The command line behind `invoke`: one function per task, whose keyword parameters are the task's flags.

Each function's signature is the one declaration of its flags: tasks.py turns
it into an Invoke task (`as_task`), with each flag's help from `HELP` (or the
command's own table). A function parses its raw flag values (a bad value is
exit 2 naming the flag), runs one command, prints its report (a table,
`--json`, or the `--dry-run` commands) on stdout and returns the exit code.
Defaults live in the options' dataclasses and are shown in the help from there.
"""

from __future__ import annotations

import inspect
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ops import settings
from ops.deploy.steps import DeployCommand
from ops.errors import EXIT_INTERRUPTED, BakehouseError, ConfigError
from ops.models.actions import ModelRequest
from ops.remote.executor import Rollout
from ops.remote.inventory import DEFAULT_INVENTORY
from ops.remote.job import ENGINES, FAN_OUT_MODES, AnsibleOptions, FanOut
from ops.remote.ssh import HOST_KEY_POLICIES, SshOptions

if TYPE_CHECKING:
    from invoke import Task

ROOT = Path(__file__).resolve().parent.parent

HELP = {
    "models": "comma-separated model names; 'all' for every model (default: models.toml's `default`)",
    "manifest": "models.toml path (default: $BAKEHOUSE_MANIFEST or ./models.toml)",
    "lock": "models.lock path (default: $BAKEHOUSE_LOCK or ./models.lock)",
    "dest": "store directory (default: $MODELS_DIR or ./models)",
    "json": "print one JSON document with per-model (and per-host) results",
    "workers": f"parallel downloads / hashes (default {ModelRequest.workers})",
    "full": "re-hash every file instead of trusting the stamp",
    "hosts": "run on these inventory hosts over SSH (comma-separated) instead of locally",
    "group": "run on every host of this inventory group over SSH",
    "inventory": f"Ansible-compatible inventory (default {DEFAULT_INVENTORY})",
    "parallel": f"hosts at a time (default {Rollout.parallel})",
    "host_keys": f"{' or '.join(HOST_KEY_POLICIES)}: strict (default) needs the key in known_hosts; accept-new records first-contact keys",
    "connect_timeout": f"SSH connect timeout in seconds (default {SshOptions.connect_timeout:g})",
    "command_timeout": "seconds each remote command may run before its host fails (default: no limit)",
    "known_hosts": "known_hosts file checked for host keys (default ~/.ssh/known_hosts)",
    "fan_out": "peers: hosts copy verified files from each other, the origin serves each file once; local: same as --from-local",
    "from_local": "fan-out: fetch once on this machine (into --dest), then copy the verified files to every host",
    "from_host": "fan-out: fetch on this host first, then copy its verified files to the other hosts",
    "engine": f"{' or '.join(ENGINES)}: ssh (default, Fabric from this process) or ansible (ansible-playbook, same inventory and steps)",
    "serial": f"ansible engine: hosts per batch, a number or a percentage (default {AnsibleOptions.serial})",
    "max_fail_percentage": f"ansible engine: stop the play when more than this share of a batch failed (default {AnsibleOptions.max_fail_percentage})",
    "dry_run": "print every command each host would run, connecting to none",
    "pieces": "also record each file's piece hashes, pieces of this size (e.g. 64MiB): the model is fetched into --dest once for that; "
              "peers then pass on each verified piece before the whole file is there",
}

DEPLOY_HELP = {
    "hosts": "deploy to these inventory hosts (comma-separated)",
    "group": "deploy to every host of this inventory group",
    "inventory": HELP["inventory"],
    "tag": "release version: the image tag on Docker hosts (default: the last build), the release name on bare hosts (default: the git revision)",
    "serial": "hosts at a time (default 1); a batch with a failed host stops the rollout",
    "dry_run": "print every command per host without connecting to any",
    "break_lock": "remove a deploy lock left by a deploy that died (the report says whose it was)",
    "json": "print one JSON document with a row per host",
    "host_keys": HELP["host_keys"],
    "connect_timeout": HELP["connect_timeout"],
    "command_timeout": HELP["command_timeout"],
    "known_hosts": HELP["known_hosts"],
    "lock": "models.lock shipped with bare-host releases (default ./models.lock)",
    "manifest": "models.toml shipped with bare-host releases (default ./models.toml)",
    "fan_out": "peers: before the rollout, bare hosts copy the release's verified models from each other (the origin serves each file once)",
}

BUILD_HELP = {
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

OTHER_HELP = {
    "push": {"tag": "local image to push (default: the last one built)", "engine": "docker or podman", "dry_run": "print the commands instead of running them"},
    "serve": {"model": "model to serve (default: $MODEL, else demo)", "port": "port to listen on (default: $PORT, else 8000)"},
    "test": {"args": 'extra pytest arguments, e.g. "-k fetch -x"', "quick": "the quick tier: unit and loopback tests, no containers, no SSH hosts, no vLLM"},
}


def as_task(command: Callable[..., int], table: Mapping[str, str] = HELP) -> Task:
    """An Invoke task whose flags are `command`'s keyword parameters (help from `table`, else HELP); a non-zero exit code is the task's."""
    from invoke import Exit, Task

    params = inspect.signature(command).parameters

    def body(c: object, **flags: object) -> None:
        code = command(**flags)
        if code:
            raise Exit(code=code)

    context = inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    body.__signature__ = inspect.Signature([context, *(p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params.values())])  # type: ignore[attr-defined]
    body.__name__ = body.__qualname__ = command.__name__
    body.__doc__ = command.__doc__
    body.__module__ = "tasks"
    return Task(body, help={name: table.get(name) or HELP[name] for name in params})


def guarded(run: Callable[[], int]) -> int:
    """Run a command; an expected failure is one line on stderr and its exit code, never a traceback."""
    settings.configure_logging()
    try:
        settings.check_endpoint()
        return run()
    except BakehouseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing half-done was activated; re-run the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED


def _print(text: str, code: int) -> int:
    print(text)
    return code


# --- model commands ----------------------------------------------------------

def _local(command: str, json: bool, **flags: object) -> int:
    """lock / fetch / verify in this process."""
    from ops.models.actions import run

    def go() -> int:
        report = run(ModelRequest.parse(command, **flags))  # type: ignore[arg-type]
        return _print(report.to_json() if json else report.render(), report.exit_code)

    return guarded(go)


def lock_models(*, models: str | None = None, manifest: str | None = None, lock: str | None = None, json: bool = False, pieces: str | None = None,
                dest: str | None = None) -> int:
    """Resolve revisions and write models.lock (commit + every file's size and sha256; with --pieces, each piece's sha256)."""
    return _local("lock", json, models=models, manifest=manifest, lock=lock, pieces=pieces, dest=dest)


def fetch_models(*, models: str | None = None, manifest: str | None = None, lock: str | None = None, json: bool = False, dest: str | None = None,
                 workers: str | None = None, fan_out: str | None = None, from_local: bool = False, from_host: str | None = None, hosts: str | None = None,
                 group: str | None = None, inventory: str | None = None, parallel: str | None = None, host_keys: str | None = None,
                 connect_timeout: str | None = None, command_timeout: str | None = None, known_hosts: str | None = None, engine: str | None = None,
                 serial: str | None = None, max_fail_percentage: str | None = None, dry_run: bool = False) -> int:
    """Download, fully verify and activate models: into the local store, or on many hosts over SSH."""
    if hosts or group:
        return fleet_command("fetch", models=models, lock=lock, dest=dest, json=json, hosts=hosts, group=group, inventory=inventory, parallel=parallel,
                             host_keys=host_keys, connect_timeout=connect_timeout, command_timeout=command_timeout, known_hosts=known_hosts, engine=engine,
                             serial=serial, max_fail_percentage=max_fail_percentage, fan_out=fan_out, from_local=from_local, from_host=from_host,
                             dry_run=dry_run)
    return _local("fetch", json, models=models, manifest=manifest, lock=lock, dest=dest, workers=workers)


def verify_models(*, models: str | None = None, manifest: str | None = None, lock: str | None = None, json: bool = False, dest: str | None = None,
                  workers: str | None = None, full: bool = False, hosts: str | None = None, group: str | None = None, inventory: str | None = None,
                  parallel: str | None = None, host_keys: str | None = None, connect_timeout: str | None = None, command_timeout: str | None = None,
                  known_hosts: str | None = None, engine: str | None = None, serial: str | None = None, max_fail_percentage: str | None = None,
                  dry_run: bool = False) -> int:
    """Verify the store against models.lock (quick by default, --full re-hashes), locally or on hosts."""
    if hosts or group:
        return fleet_command("verify", models=models, lock=lock, full=full, json=json, hosts=hosts, group=group, inventory=inventory, parallel=parallel,
                             host_keys=host_keys, connect_timeout=connect_timeout, command_timeout=command_timeout, known_hosts=known_hosts, engine=engine,
                             serial=serial, max_fail_percentage=max_fail_percentage, dry_run=dry_run)
    return _local("verify", json, models=models, manifest=manifest, lock=lock, dest=dest, workers=workers, full=full)


def ssh_options(*, host_keys: str | None, connect_timeout: object, command_timeout: object, known_hosts: str | None) -> SshOptions:
    d = SshOptions()
    return SshOptions(
        known_hosts=Path(known_hosts).expanduser() if known_hosts else d.known_hosts,
        host_key_policy=settings.choice("--host-keys", host_keys, HOST_KEY_POLICIES, default=d.host_key_policy),
        connect_timeout=float(settings.number("--connect-timeout", connect_timeout, default=d.connect_timeout, kind=float)),
        command_timeout=float(settings.number("--command-timeout", command_timeout, default=0, kind=float)) if command_timeout else None,
    )


def select_hosts(inventory: str | None, hosts: str | None, group: str | None) -> list:
    from ops.remote.inventory import load_inventory

    return load_inventory(Path(inventory or DEFAULT_INVENTORY)).select(list(settings.names(hosts)) or None, group)


def fan_out_for(mode: str | None, *, from_local: bool, from_host: str | None, dest: str | None) -> FanOut | None:
    """One fan-out mode from --fan-out, --from-local and --from-host (at most one of them)."""
    given = [f for f, v in (("--fan-out", mode), ("--from-local", from_local), ("--from-host", from_host)) if v]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)}: choose one fan-out mode.")
    if from_host:
        chosen = "host"
    elif from_local:
        chosen = "local"
    else:
        chosen = settings.choice("--fan-out", mode, [m for m in FAN_OUT_MODES if m != "host"]) if mode else ""
    return FanOut(chosen, Path(dest) if dest else settings.default_models_dir(), from_host) if chosen else None  # type: ignore[arg-type]


def fleet_command(command: str, *, models: str | None = None, lock: str | None = None, dest: str | None = None, full: bool = False, json: bool = False,
                  hosts: str | None = None, group: str | None = None, inventory: str | None = None, parallel: object = None, host_keys: str | None = None,
                  connect_timeout: object = None, command_timeout: object = None, known_hosts: str | None = None, engine: str | None = None,
                  serial: str | None = None, max_fail_percentage: object = None, fan_out: str | None = None, from_local: bool = False,
                  from_host: str | None = None, dry_run: bool = False) -> int:
    """fetch / verify on hosts over SSH (or Ansible), a row per host."""
    from ops.remote.fleet import run_fleet
    from ops.remote.job import FleetJob

    def go() -> int:
        job = FleetJob(
            command="fetch" if command == "fetch" else "verify",
            lock=Path(lock) if lock else settings.default_lock(),
            models=settings.names(models),
            full=full,
            ssh=ssh_options(host_keys=host_keys, connect_timeout=connect_timeout, command_timeout=command_timeout, known_hosts=known_hosts),
            rollout=Rollout(parallel=int(settings.number("--parallel", parallel, default=Rollout.parallel, maximum=1024))),
            fan_out=fan_out_for(fan_out, from_local=from_local, from_host=from_host, dest=dest),
            engine=settings.choice("--engine", engine, ENGINES, default="ssh"),
            ansible=AnsibleOptions(serial=str(serial or AnsibleOptions.serial),
                                   max_fail_percentage=int(settings.number("--max-fail-percentage", max_fail_percentage, default=AnsibleOptions.max_fail_percentage,
                                                                           minimum=0, maximum=100))),
            dry_run=dry_run,
        )
        results = run_fleet(job, select_hosts(inventory, hosts, group), Path(inventory or DEFAULT_INVENTORY))
        return _print(results.render(as_json=json, dry_run=dry_run), 0 if dry_run else results.exit_code)

    return guarded(go)


# --- deploy and rollback -----------------------------------------------------

def deploy(*, hosts: str | None = None, group: str | None = None, inventory: str | None = None, tag: str | None = None, serial: str | None = None,
           dry_run: bool = False, break_lock: bool = False, json: bool = False, host_keys: str | None = None, connect_timeout: str | None = None,
           command_timeout: str | None = None, known_hosts: str | None = None, lock: str | None = None, manifest: str | None = None,
           fan_out: str | None = None) -> int:
    """Put a release on Docker, bare and webhook hosts, gated on /ready, rolled back when it fails."""
    return _deploy("deploy", hosts=hosts, group=group, inventory=inventory, tag=tag, serial=serial, dry_run=dry_run, break_lock=break_lock, json=json,
                   host_keys=host_keys, connect_timeout=connect_timeout, command_timeout=command_timeout, known_hosts=known_hosts, lock=lock,
                   manifest=manifest, fan_out=fan_out)


def rollback(*, hosts: str | None = None, group: str | None = None, inventory: str | None = None, serial: str | None = None, dry_run: bool = False,
             break_lock: bool = False, json: bool = False, host_keys: str | None = None, connect_timeout: str | None = None, command_timeout: str | None = None,
             known_hosts: str | None = None) -> int:
    """Back to the previous release (bare) or image (Docker) on each host, gated on /ready."""
    return _deploy("rollback", hosts=hosts, group=group, inventory=inventory, serial=serial, dry_run=dry_run, break_lock=break_lock, json=json,
                   host_keys=host_keys, connect_timeout=connect_timeout, command_timeout=command_timeout, known_hosts=known_hosts)


def _deploy(command: DeployCommand, *, hosts: str | None, group: str | None, inventory: str | None, serial: object, dry_run: bool, break_lock: bool,
            json: bool, host_keys: str | None, connect_timeout: object, command_timeout: object, known_hosts: str | None, tag: str | None = None,
            lock: str | None = None, manifest: str | None = None, fan_out: str | None = None) -> int:
    from ops.deploy import rollout

    def go() -> int:
        p = rollout.plan(
            command,
            select_hosts(inventory, hosts, group),
            project=ROOT,
            tag=tag,
            serial=int(settings.number("--serial", serial, default=1, maximum=1024)),
            ssh=ssh_options(host_keys=host_keys, connect_timeout=connect_timeout, command_timeout=command_timeout, known_hosts=known_hosts),
            break_lock=break_lock,
            manifest=Path(manifest) if manifest else settings.default_manifest(),
            lock=Path(lock) if lock else settings.default_lock(),
            fan_out=settings.choice("--fan-out", fan_out, rollout.DEPLOY_FAN_OUT) if fan_out else None,
        )
        results = rollout.execute(p, dry_run=dry_run)
        return _print(results.render(as_json=json, dry_run=dry_run), 0 if dry_run else results.exit_code)

    return guarded(go)


# --- images ------------------------------------------------------------------

def proxies() -> dict[str, str]:
    """Proxy settings from the environment become build arguments (the first seed's http_proxy/https_proxy)."""
    return {k: os.environ[k] for k in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY") if os.environ.get(k)}


def build(*, bake: bool = False, models: str | None = None, gpu: bool = False, engine: str | None = None, tag: str | None = None, base_image: str | None = None,
          torch_wheels: str | None = None, torch_index_url: str | None = None, ca_bundle: str | None = None, no_cache: bool = False, dry_run: bool = False) -> int:
    """Build the image (multi-stage; --bake puts verified weights in their own cached layer)."""
    from ops.images.actions import BuildRequest
    from ops.images.actions import build as build_image

    def go() -> int:
        wheels = torch_wheels or os.environ.get("PIP_FIND_LINKS", "")
        req = BuildRequest(
            context=Path.cwd(),
            bake=bool(bake or models),
            models=settings.names(models),
            gpu=gpu,
            engine=engine,
            tag=tag,
            base_image=base_image,
            torch_wheels=Path(wheels) if wheels and Path(wheels).is_dir() else None,
            torch_index_url=torch_index_url or "",
            ca_bundle=Path(ca_bundle) if ca_bundle else None,
            proxies=proxies(),
            image_name=os.environ.get("BAKEHOUSE_IMAGE", "bakehouse"),
            no_cache=no_cache,
        )
        report = build_image(req, dry_run=dry_run)
        return _print(shlex.join(report.argv) if dry_run else report.render(), 0)

    return guarded(go)


def push(*, tag: str | None = None, engine: str | None = None, dry_run: bool = False) -> int:
    """Push the image to $BAKEHOUSE_REGISTRY (password on stdin, never in argv)."""
    from ops.images.actions import push as push_image

    def go() -> int:
        report = push_image(Path.cwd(), tag=tag, engine=engine, dry_run=dry_run)
        return _print("\n".join(shlex.join(a) for a in report.argv) if dry_run else report.render(), 0)

    return guarded(go)


# --- the app and the demo ----------------------------------------------------

def serve(*, model: str | None = None, port: str | None = None) -> int:
    """Run the app locally: quick verify (fetch if missing), then serve the OpenAI-compatible API."""
    from app.entrypoint import main

    # Loopback unless HOST says otherwise: a laptop's `invoke serve` is not a server for the network (the image and deploys bind as configured).
    host = None if os.environ.get("HOST") else "127.0.0.1"
    return guarded(lambda: main(model=model, host=host, port=int(settings.number("--port", port, default=8000, maximum=65535)) if port else None))


def demo() -> int:
    """The whole path offline on the bundled demo model: local hub, lock, fetch, verify, serve, one completion."""
    from ops.demo import run_demo

    return guarded(lambda: run_demo(ROOT / ".demo"))


QUICK_TIER = "not containers and not hosts and not vllm and not slow"


LINTERS = ([sys.executable, "-m", "ruff", "check", "."], [sys.executable, "-m", "mypy"])  # the whole tree, tests and benchmarks too


def test(*, args: str = "", quick: bool = False) -> int:
    """The linters (ruff on the tree, mypy on ops/ and app/), then the test suite (real servers on loopback); --quick: the unit and loopback tier only."""
    for linter in LINTERS:
        if code := subprocess.call(linter, cwd=ROOT):
            return code
    # Two workers, a test file to each: waits on hosts, containers and servers overlap (module fixtures stay per file).
    argv = [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadfile", *(["-m", QUICK_TIER] if quick else []), *shlex.split(args)]
    return subprocess.call(argv, cwd=ROOT)
