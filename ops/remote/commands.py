"""What runs on a host, as argv lists: the building blocks every remote step uses. Nothing here connects anywhere.

Values travel as positional parameters ("$1", "$2") of fixed `sh -c` scripts,
never spliced into a script, so a path or a version cannot become shell code.
Fleet bootstrap and bare-host releases install with the same blocks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ops.remote.inventory import Host

# Only these reach the remote model commands; HF_TOKEN goes on stdin instead.
FORWARDED_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY")
# Secrets arrive on stdin; umask makes the file 0600 from its first byte.
_WRITE = 'umask {mask} && mkdir -p "$(dirname "$1")" && cat > "$1.tmp" && mv -f "$1.tmp" "$1"'


def forwarded_env() -> dict[str, str]:
    """This machine's hub settings that hosts' model commands and containers get."""
    return {k: v for k, v in os.environ.items() if k in FORWARDED_ENV}


def mkdir_argv(*paths: str) -> list[str]:
    return ["mkdir", "-p", *paths]


def write_file_argv(path: str, *, public: bool = False) -> list[str]:
    """Write stdin to `path` (0600, atomically): how env files and secrets reach a host, never through argv. `public`: 0644 (a proxy's config)."""
    return ["sh", "-c", _WRITE.format(mask="022" if public else "077"), "sh", path]


def read_argv(path: str) -> list[str]:
    """A small state file's content (empty output when it does not exist)."""
    return ["sh", "-c", 'cat "$1" 2>/dev/null || true', "sh", path]


def write_value_argv(path: str, value: str) -> list[str]:
    """A small state file, replaced atomically."""
    return ["sh", "-c", 'printf "%s\\n" "$2" > "$1.new" && mv -f "$1.new" "$1"', "sh", path, value]


def exists_argv(path: str) -> list[str]:
    return ["test", "-e", path]


def discard_argv(path: str) -> list[str]:
    """Move a partial directory aside, then remove it: a step still running there from a killed run cannot block the next one."""
    return ["sh", "-c", '[ -e "$1" ] || exit 0; t="$1.abandoned-$$"; mv "$1" "$t" && { rm -rf "$t" 2>/dev/null || true; }', "sh", path]


def venv_python(venv: str) -> str:
    return f"{venv}/bin/python"


def venv_argv(python: str, venv: str, *, system_site_packages: bool = False) -> list[str]:
    return [python, "-m", "venv", *(["--system-site-packages"] if system_site_packages else []), venv]


def pip_install_argv(python: str, wheels: Sequence[str], *, force_reinstall: bool = False) -> list[str]:
    """Exactly these wheels, offline: no index, nothing else pulled in."""
    return [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", *(["--force-reinstall"] if force_reinstall else []), *wheels]


def mark_argv(path: str, text: str = "") -> list[str]:
    """Write `text` to the mark at `path`: what was installed there, written last so a crash never leaves a false mark."""
    return ["sh", "-c", 'printf "%s" "$2" > "$1"', "sh", path, text]


def marked_argv(path: str, text: str) -> list[str]:
    """Exit 0 when the mark at `path` holds exactly `text`."""
    return ["sh", "-c", '[ "$(cat "$1" 2>/dev/null)" = "$2" ]', "sh", path, text]


# --- the fleet's private venv: what `fetch-models --hosts` installs -------------

def fleet_venv(host: Host) -> str:
    return f"{host.prefix}/venv"


def wheelhouse_dir(host: Host) -> str:
    return f"{host.prefix}/wheelhouse"


def lock_path(host: Host) -> str:
    return f"{host.prefix}/models.lock"


@dataclass(frozen=True)
class Bootstrap:
    """The steps that make a host's venv hold exactly one wheelhouse (SSH and Ansible engines run these same argv)."""

    check: list[str]  # exit 0: already installed
    mkdir: list[str]
    wheelhouse: str  # where the wheels are uploaded
    venv: list[str]
    install: list[str]
    mark: list[str]


def bootstrap(host: Host, wheels: Sequence[str], digest: str) -> Bootstrap:
    venv, marker = fleet_venv(host), f"{fleet_venv(host)}/.bakehouse-wheelhouse"
    return Bootstrap(
        check=marked_argv(marker, digest),
        mkdir=mkdir_argv(wheelhouse_dir(host), host.models_dir),
        wheelhouse=wheelhouse_dir(host),
        venv=venv_argv(host.python, venv),
        install=pip_install_argv(venv_python(venv), [f"{wheelhouse_dir(host)}/{w}" for w in wheels], force_reinstall=True),
        mark=mark_argv(marker, digest),
    )


def model_env(command: str, token: str, *, progress_seconds: float = 2.0) -> dict[str, str]:
    """What a host's model command gets on stdin: this machine's hub settings, progress every few seconds, the token for a fetch."""
    return {**forwarded_env(), "BAKEHOUSE_PROGRESS_SECONDS": f"{progress_seconds:g}", **({"HF_TOKEN": token} if token and command == "fetch" else {})}


def model_argv(host: Host, command: str, *, models: Sequence[str], full: bool = False) -> list[str]:
    """`python -m ops.models fetch|verify` on the host, against the uploaded lock; its settings (and any secret) on stdin."""
    argv = [venv_python(fleet_venv(host)), "-m", "ops.models", command, "--lock", lock_path(host), "--dest", host.models_dir, "--json", "--env-stdin"]
    if models:
        argv += ["--models", ",".join(models)]
    if full:
        argv.append("--full")
    return argv
