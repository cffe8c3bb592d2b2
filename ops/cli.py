"""The command line behind `invoke`: each task hands its raw flag values to one function here.

Each function parses its flags (a bad value is exit 2 naming the flag), runs
one command, prints its report (a table, `--json`, or the `--dry-run`
commands) on stdout and returns the exit code. Defaults live in the options'
dataclasses and are shown in the help from there.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from ops import settings
from ops.errors import EXIT_INTERRUPTED, BakehouseError, ConfigError
from ops.models.actions import ModelRequest
from ops.remote.executor import Rollout
from ops.remote.inventory import DEFAULT_INVENTORY
from ops.remote.job import ENGINES, FAN_OUT_MODES, AnsibleOptions, FanOut
from ops.remote.ssh import HOST_KEY_POLICIES, SshOptions

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

REMOTE_FLAGS = ("hosts", "group", "inventory", "parallel", "host_keys", "connect_timeout", "command_timeout", "known_hosts", "engine", "serial",
                "max_fail_percentage", "dry_run")


def help_for(*names: str, table: dict[str, str] = HELP) -> dict[str, str]:
    return {n: table[n] for n in names}


def guarded(run: Callable[[], int]) -> int:
    """Run a command; an expected failure is one line on stderr and its exit code, never a traceback."""
    settings.configure_logging()
    try:
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

def model_command(command: str, *, json: bool = False, **flags: object) -> int:
    """lock / fetch / verify in this process."""
    from ops.models.actions import run

    def go() -> int:
        report = run(ModelRequest.parse(command, **flags))  # type: ignore[arg-type]
        return _print(report.to_json() if json else report.render(), report.exit_code)

    return guarded(go)


LOCAL_FLAGS = ("models", "manifest", "lock", "dest", "workers", "json", "full")
FLEET_FLAGS = ("models", "lock", "dest", "full", "json", "fan_out", "from_local", "from_host", *REMOTE_FLAGS)


def fetch_models(**flags: object) -> int:
    """Locally, or on hosts when --hosts or --group is given."""
    return _models("fetch", flags)


def verify_models(**flags: object) -> int:
    return _models("verify", flags)


def _models(command: str, flags: dict[str, object]) -> int:
    if flags.get("hosts") or flags.get("group"):
        return fleet_command(command, **{k: v for k, v in flags.items() if k in FLEET_FLAGS})  # type: ignore[arg-type]
    return model_command(command, **{k: v for k, v in flags.items() if k in LOCAL_FLAGS})


def ssh_options(*, host_keys: str | None, connect_timeout: object, command_timeout: object, known_hosts: str | None) -> SshOptions:
    d = SshOptions()
    return SshOptions(
        known_hosts=Path(known_hosts).expanduser() if known_hosts else d.known_hosts,
        host_key_policy=settings.choice("--host-keys", host_keys, HOST_KEY_POLICIES, default=d.host_key_policy),  # type: ignore[arg-type]
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
            engine=settings.choice("--engine", engine, ENGINES, default="ssh"),  # type: ignore[arg-type]
            ansible=AnsibleOptions(serial=str(serial or AnsibleOptions.serial),
                                   max_fail_percentage=int(settings.number("--max-fail-percentage", max_fail_percentage, default=AnsibleOptions.max_fail_percentage,
                                                                           minimum=0, maximum=100))),
            dry_run=dry_run,
        )
        results = run_fleet(job, select_hosts(inventory, hosts, group), Path(inventory or DEFAULT_INVENTORY))
        return _print(results.render(as_json=json, dry_run=dry_run), 0 if dry_run else results.exit_code)

    return guarded(go)


# --- deploy and rollback -----------------------------------------------------

def deploy(command: str, *, hosts: str | None = None, group: str | None = None, inventory: str | None = None, tag: str | None = None, serial: object = None,
           dry_run: bool = False, break_lock: bool = False, json: bool = False, host_keys: str | None = None, connect_timeout: object = None,
           command_timeout: object = None, known_hosts: str | None = None, lock: str | None = None, manifest: str | None = None,
           fan_out: str | None = None) -> int:
    from ops.deploy import rollout

    def go() -> int:
        p = rollout.plan(
            "rollback" if command == "rollback" else "deploy",
            select_hosts(inventory, hosts, group),
            project=ROOT,
            tag=tag,
            serial=int(settings.number("--serial", serial, default=1, maximum=1024)),
            ssh=ssh_options(host_keys=host_keys, connect_timeout=connect_timeout, command_timeout=command_timeout, known_hosts=known_hosts),
            break_lock=break_lock,
            manifest=Path(manifest) if manifest else settings.default_manifest(),
            lock=Path(lock) if lock else settings.default_lock(),
            fan_out=settings.choice("--fan-out", fan_out, ["peers"]) if fan_out else None,  # type: ignore[arg-type]
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
    from ops.images.actions import push as push_image

    def go() -> int:
        report = push_image(Path.cwd(), tag=tag, engine=engine, dry_run=dry_run)
        return _print("\n".join(shlex.join(a) for a in report.argv) if dry_run else report.render(), 0)

    return guarded(go)


# --- the app and the demo ----------------------------------------------------

def serve(*, model: str | None = None, port: object = None) -> int:
    from app.entrypoint import main

    return guarded(lambda: main(model=model, port=int(settings.number("--port", port, default=8000, maximum=65535)) if port else None))


def demo() -> int:
    from ops.demo import run_demo

    return guarded(lambda: run_demo(ROOT / ".demo"))
