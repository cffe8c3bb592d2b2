"""A release on a bare host, as argv lists and file texts. Nothing here connects anywhere.

    {prefix}/wheels/              dependency wheels (kept, so the next deps change uploads only what changed)
    {prefix}/deps/<digest>/       a venv with the app's dependencies (torch, transformers, …), shared by releases
    {prefix}/releases/<version>/  this project's wheel, its venv (linked to its deps), models.toml, models.lock
    {prefix}/current -> releases/<version>   switched atomically (rename over the old link)
    {prefix}/releases/<version>/app.env   the environment that release runs with, secrets included, 0600
    {prefix}/releases/<version>/config    the digest of that env file (the history shows it, never the values)
    {prefix}/run/                 the fallback supervisor's pid, state and log
    {prefix}/history              versions that became ready, oldest first
"""

from __future__ import annotations

from collections.abc import Sequence

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


def current_env_path(t: Target) -> str:
    """What the service reads: the env file of whatever release `current` points at."""
    return f"{t.prefix}/current/app.env"


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
    return ["sh", "-c", 'ln -sfn "$2" "$1.new" && mv -T "$1.new" "$1"', "sh", f"{t.prefix}/current", f"releases/{version}"]


def prune_argv(t: Target, keep: Sequence[str]) -> list[str]:
    """Remove releases not in `keep`, then deps venvs no kept release uses."""
    return ["sh", "-c", _PRUNE, "sh", t.prefix, *keep]


def app_env(t: Target) -> dict[str, str]:
    """The app's settings on a bare host; the models were fetched and verified by the deploy."""
    return {
        "MODEL": t.model,
        "HOST": "0.0.0.0",
        "PORT": str(t.port),
        "MODELS_DIR": t.host.models_dir,
        "BAKEHOUSE_MANIFEST": f"{t.prefix}/current/models.toml",
        "BAKEHOUSE_LOCK": f"{t.prefix}/current/models.lock",
        "BAKEHOUSE_AUTO_FETCH": "0",
        "HF_HUB_OFFLINE": "1",
        **t.app_env,
    }


def app_argv(t: Target) -> list[str]:
    return [f"{t.prefix}/current/venv/bin/python", "-m", "app.entrypoint"]


# --- systemd -----------------------------------------------------------------

def unit_path(t: Target) -> str:
    return f"/etc/systemd/system/{t.service}.service"


def unit_text(t: Target) -> str:
    """The service unit. It runs whatever `current` points at, so a switch plus a restart is a deploy."""
    return "\n".join([
        "[Unit]",
        f"Description=bakehouse inference server ({t.model})",
        "After=network-online.target",
        "Wants=network-online.target",
        "StartLimitIntervalSec=60",
        "StartLimitBurst=3",
        "",
        "[Service]",
        "Type=simple",
        f"EnvironmentFile={current_env_path(t)}",
        f"WorkingDirectory={t.prefix}",
        "ExecStart=" + " ".join(app_argv(t)),
        "Restart=on-failure",
        "RestartSec=2",
        "TimeoutStopSec=30",
        "KillMode=mixed",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def supervise_argv(t: Target, action: str) -> list[str]:
    """The fallback process manager (ops.deploy.supervise), run by the current release's python."""
    argv = [f"{t.prefix}/current/venv/bin/python", "-m", "ops.deploy.supervise", action, "--run-dir", f"{t.prefix}/run"]
    if action in ("start", "restart"):
        argv += ["--env-file", current_env_path(t), "--", *app_argv(t)]
    return argv


def restart_argvs(t: Target) -> list[list[str]]:
    if t.process_manager == "systemd":
        # reset-failed: a release that crashed moments ago must not use up the start limit of the one that replaces it.
        # (A unit that never ran is "not loaded" for reset-failed: nothing to reset.)
        return [["systemctl", "daemon-reload"], ["sh", "-c", 'systemctl reset-failed "$1" 2>/dev/null || true', "sh", t.service],
                ["systemctl", "enable", "--quiet", t.service], ["systemctl", "restart", t.service]]
    return [supervise_argv(t, "restart")]


def stop_argv(t: Target) -> list[str]:
    return ["systemctl", "stop", t.service] if t.process_manager == "systemd" else supervise_argv(t, "stop")


def alive_argv(t: Target) -> list[str]:
    """Exit 0 while the app process is up and has not exited since it was (re)started."""
    return ["systemctl", "is-active", "--quiet", t.service] if t.process_manager == "systemd" else supervise_argv(t, "status")


def logs_argv(t: Target) -> list[str]:
    if t.process_manager == "systemd":
        return ["journalctl", "-u", t.service, "-n", "20", "--no-pager", "-o", "cat"]
    return ["tail", "-n", "20", f"{t.prefix}/run/app.log"]
