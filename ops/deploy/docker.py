"""An image on a Docker (or podman) host, as argv lists. Nothing here connects anywhere.

Two instances, containers `<container>-<port>` on the host network, each bound
to loopback on one of the host's `instance_ports`, behind the front proxy's
container `<container>-proxy` (Caddy from the app image, ops.deploy.proxy),
which owns the public port. A deploy starts the new image in the idle
instance and drains the old one (ops.deploy.steps); `<prefix>/<container>.active`
names the instance serving.
"""

from __future__ import annotations

from collections.abc import Mapping

from ops.deploy import proxy
from ops.deploy.target import Target
from ops.images import registry as reg
from ops.images.registry import Registry, remote_ref


def image_ref(t: Target, registry: Registry, tag: str) -> str:
    return f"{t.image or remote_ref(registry, 'bakehouse')}:{tag}"


def login_argv(t: Target, registry: Registry) -> list[str]:
    """The password goes on stdin, never in argv."""
    return reg.login_argv(t.engine, registry)


def pull_argv(t: Target, registry: Registry, ref: str) -> list[str]:
    return [t.engine, "pull", *reg.tls_flags(t.engine, registry), "--quiet", ref]


def image_present_argv(t: Target, ref: str) -> list[str]:
    return ["sh", "-c", '"$1" image inspect "$2" >/dev/null 2>&1', "sh", t.engine, ref]


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
    """The containers' settings (each instance adds its port); models come baked or are fetched at start into the mounted store."""
    return {"MODEL": t.model, **forwarded, **t.app_env}


def instance(t: Target, port: int) -> str:
    """The container of the instance on `port`."""
    return f"{t.container}-{port}"


def instance_env_path(t: Target, port: int) -> str:
    return f"{t.prefix}/{instance(t, port)}.env"


def run_argv(t: Target, ref: str, port: int) -> list[str]:
    """An instance: host network, bound to loopback on its port (the proxy in front), drained on stop (SIGTERM, then the stop timeout)."""
    volume = ["--volume", f"{t.host.models_dir}:/models"] if t.models_volume else []
    return [
        t.engine, "run", "--detach", "--name", instance(t, port), "--network", "host", "--restart", "on-failure:3",
        "--stop-timeout", str(t.stop_timeout), "--env-file", instance_env_path(t, port), *volume, *gpu_flags(t.engine, t.gpus),
        "--label", "bakehouse.deploy=1", ref,
    ]


def running_image_argv(t: Target, port: int) -> list[str]:
    """The image reference the instance's container was started from (empty output when there is none)."""
    return ["sh", "-c", '"$1" inspect --format "{{.Config.Image}}" "$2" 2>/dev/null || true', "sh", t.engine, instance(t, port)]


def active_path(t: Target) -> str:
    return f"{t.prefix}/{t.container}.active"


def mkdir_argv(t: Target) -> list[str]:
    """The deploy's directory, and the models volume owned by the image's user so the app can fetch into it."""
    if not t.models_volume:
        return ["mkdir", "-p", t.prefix]
    return ["sh", "-c", 'mkdir -p "$1" "$2" && chown "$3:$3" "$2"', "sh", t.prefix, t.host.models_dir, str(t.container_uid)]


def stop_argv(t: Target, port: int) -> list[str]:
    """Stop the instance (SIGTERM: it drains) and remove its container; nothing when there is none."""
    return ["sh", "-c", '"$1" container inspect "$2" >/dev/null 2>&1 || exit 0; "$1" stop -t "$3" "$2" >/dev/null && "$1" rm -f "$2" >/dev/null', "sh",
            t.engine, instance(t, port), str(t.stop_timeout)]


def running_argv(t: Target, name: str) -> list[str]:
    """Exit 0 while the container runs."""
    return ["sh", "-c", '[ "$("$1" inspect --format "{{.State.Status}}" "$2" 2>/dev/null)" = running ]', "sh", t.engine, name]


def alive_argv(t: Target, port: int) -> list[str]:
    return running_argv(t, instance(t, port))


def logs_argv(t: Target, port: int) -> list[str]:
    return ["sh", "-c", '"$1" logs --tail 20 "$2" 2>&1', "sh", t.engine, instance(t, port)]


# --- the front proxy: a container from the app image, which carries Caddy (ops.deploy.proxy) ---------------

def proxy_container(t: Target) -> str:
    return f"{t.container}-proxy"


def proxy_run_argv(t: Target, ref: str) -> list[str]:
    return [t.engine, "run", "--detach", "--name", proxy_container(t), "--network", "host", "--restart", "unless-stopped",
            "--entrypoint", "caddy", "--env", "HOME=/tmp", "--env", "XDG_DATA_HOME=/tmp", "--env", "XDG_CONFIG_HOME=/tmp",
            "--volume", f"{proxy.proxy_dir(t)}:/etc/bakehouse-proxy:ro", "--label", "bakehouse.deploy=1", ref,
            "run", "--config", f"/etc/bakehouse-proxy/{proxy.CONFIG}"]


def proxy_alive_argv(t: Target) -> list[str]:
    return running_argv(t, proxy_container(t))


def proxy_remove_argv(t: Target) -> list[str]:
    return remove_argv(t, proxy_container(t))


def remove_argv(t: Target, name: str) -> list[str]:
    return ["sh", "-c", '"$1" rm -f "$2" >/dev/null 2>&1 || true', "sh", t.engine, name]


def retire_legacy_argvs(t: Target) -> list[list[str]]:
    """A host deployed before the front proxy ran one container on the public port: it goes, once (the proxy takes the port)."""
    return [remove_argv(t, t.container), remove_argv(t, f"{t.container}-previous")]
