"""What runs on a bare host, as argv lists. Nothing here connects anywhere."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ops.remote.inventory import Host

# Only these reach the remote model commands; HF_TOKEN goes on stdin instead.
FORWARDED_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY")


def venv_python(host: Host) -> str:
    return f"{host.prefix}/venv/bin/python"


def wheelhouse(host: Host) -> str:
    return f"{host.prefix}/wheelhouse"


def marker(host: Host, digest: str) -> str:
    return f"{host.prefix}/venv/.bakehouse-{digest}"


def check_marker_argv(host: Host, digest: str) -> list[str]:
    return ["test", "-e", marker(host, digest)]


def mkdir_argv(*paths: str) -> list[str]:
    return ["mkdir", "-p", *paths]


def venv_argv(host: Host) -> list[str]:
    return [host.python, "-m", "venv", f"{host.prefix}/venv"]


def install_argv(host: Host, wheels: Sequence[str]) -> list[str]:
    """Install exactly the uploaded wheels, offline: no index, nothing else pulled in."""
    return [venv_python(host), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--force-reinstall", *[f"{wheelhouse(host)}/{w}" for w in wheels]]


def touch_marker_argv(host: Host, digest: str) -> list[str]:
    return ["sh", "-c", 'rm -f "$1"/.bakehouse-* && touch "$2"', "sh", f"{host.prefix}/venv", marker(host, digest)]


def model_argv(host: Host, command: str, *, models: Sequence[str], env: Mapping[str, str], full: bool = False, token_stdin: bool = False, progress_seconds: float = 2.0) -> list[str]:
    """`python -m ops.models fetch|verify` on the host, against the uploaded lock, token on stdin."""
    pairs = [f"{k}={env[k]}" for k in FORWARDED_ENV if env.get(k)] + [f"BAKEHOUSE_PROGRESS_SECONDS={progress_seconds:g}"]
    argv = ["env", *pairs, venv_python(host), "-m", "ops.models", command, "--lock", f"{host.prefix}/models.lock", "--dest", host.models_dir, "--json"]
    if models:
        argv += ["--models", ",".join(models)]
    if token_stdin:
        argv.append("--token-stdin")
    if full:
        argv.append("--full")
    return argv
