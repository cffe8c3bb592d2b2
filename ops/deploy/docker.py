"""An image on a Docker (or podman) host, as argv lists. Nothing here connects anywhere.

One container named `container` serves; during a deploy the old one is stopped
and renamed `<container>-previous` (a GPU rarely holds two copies of a model),
the new one starts, and only once it answers /ready is the old one removed.
"""

from __future__ import annotations

from collections.abc import Mapping

from ops.deploy.target import Target
from ops.images import registry as reg
from ops.images.registry import Registry, remote_ref


def previous(t: Target) -> str:
    return f"{t.container}-previous"


def env_path(t: Target) -> str:
    return f"{t.prefix}/{t.container}.env"


def image_ref(t: Target, registry: Registry, tag: str) -> str:
    return f"{t.image or remote_ref(registry, 'bakehouse')}:{tag}"


def login_argv(t: Target, registry: Registry) -> list[str]:
    """The password goes on stdin, never in argv."""
    return reg.login_argv(t.engine, registry)


def pull_argv(t: Target, registry: Registry, ref: str) -> list[str]:
    return [t.engine, "pull", *reg.tls_flags(t.engine, registry), "--quiet", ref]


def image_present_argv(t: Target, ref: str) -> list[str]:
    return ["sh", "-c", '"$1" image inspect "$2" >/dev/null 2>&1', "sh", t.engine, ref]


def running_image_argv(t: Target) -> list[str]:
    """The image reference the serving container was started from (empty output when there is none)."""
    return ["sh", "-c", '"$1" inspect --format "{{.Config.Image}}" "$2" 2>/dev/null || true', "sh", t.engine, t.container]


def gpu_flags(engine: str, gpus: str) -> list[str]:
    """GPUs for the container: docker's --gpus, podman's CDI devices (nvidia-container-toolkit)."""
    if not gpus or gpus == "none":
        return []
    if engine == "docker":
        return ["--gpus", "all" if gpus == "all" else f'"device={gpus}"']
    return [f"--device=nvidia.com/gpu={g.strip()}" for g in gpus.split(",")]


def gpu_check_argv(t: Target) -> list[str] | None:
    """Exit 0 when the host can give the container its GPUs: the driver answers, and for podman a CDI spec names them. None: no GPUs asked."""
    if not t.gpus or t.gpus == "none":
        return None
    driver = "command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1"
    if t.engine == "docker":
        return ["sh", "-c", f'{driver} && "$1" info --format "{{{{json .Runtimes}}}}" 2>/dev/null | grep -q nvidia', "sh", t.engine]
    cdi = "{ nvidia-ctk cdi list 2>/dev/null | grep -q nvidia.com/gpu || ls /etc/cdi/*nvidia* /var/run/cdi/*nvidia* >/dev/null 2>&1; }"
    return ["sh", "-c", f"{driver} && {cdi}"]


def app_env(t: Target, forwarded: Mapping[str, str]) -> dict[str, str]:
    """The container's settings; models come baked or are fetched at start into the mounted store."""
    return {"MODEL": t.model, "HOST": "0.0.0.0", "PORT": str(t.port), **forwarded, **t.app_env}


def run_argv(t: Target, ref: str) -> list[str]:
    volume = ["--volume", f"{t.host.models_dir}:/models"] if t.models_volume else []
    return [
        t.engine, "run", "--detach", "--name", t.container, "--network", "host", "--restart", "on-failure:3",
        "--env-file", env_path(t), *volume, *gpu_flags(t.engine, t.gpus), "--label", "bakehouse.deploy=1", ref,
    ]


def mkdir_argv(t: Target) -> list[str]:
    """The deploy's directory, and the models volume owned by the image's user so the app can fetch into it."""
    if not t.models_volume:
        return ["mkdir", "-p", t.prefix]
    return ["sh", "-c", 'mkdir -p "$1" "$2" && chown "$3:$3" "$2"', "sh", t.prefix, t.host.models_dir, str(t.container_uid)]


def retire_argvs(t: Target) -> list[list[str]]:
    """Stop the serving container and keep it aside, in case the new one never becomes ready."""
    return [
        remove_argv(t, previous(t)),
        ["sh", "-c", '! "$1" container inspect "$2" >/dev/null 2>&1 || { "$1" stop -t 30 "$2" && "$1" rename "$2" "$3"; }', "sh", t.engine, t.container, previous(t)],
    ]


def remove_argv(t: Target, name: str) -> list[str]:
    return ["sh", "-c", '"$1" rm -f "$2" >/dev/null 2>&1 || true', "sh", t.engine, name]


def restore_argvs(t: Target) -> list[list[str]]:
    """Put the kept-aside container back and start it."""
    return [remove_argv(t, t.container), [t.engine, "rename", previous(t), t.container], [t.engine, "start", t.container]]


def alive_argv(t: Target) -> list[str]:
    """Exit 0 while the container runs."""
    return ["sh", "-c", '[ "$("$1" inspect --format "{{.State.Status}}" "$2" 2>/dev/null)" = running ]', "sh", t.engine, t.container]


def logs_argv(t: Target) -> list[str]:
    return ["sh", "-c", '"$1" logs --tail 20 "$2" 2>&1', "sh", t.engine, t.container]
