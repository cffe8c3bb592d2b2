"""What a host's inventory variables say about deploying there.

Every deploy variable has a default, so a host that fetches models today can be
deployed to by adding nothing but `runtime`. Bad values stop the run before any
host is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ops.errors import ConfigError
from ops.images.build import ENGINES, ContainerEngine
from ops.models.values import NAME
from ops.remote.inventory import Host

ProcessManager = Literal["systemd", "supervise"]
Strategy = Literal["blue-green", "hold"]  # blue-green: two copies fit; hold: one GPU, one copy (the proxy holds requests while it reloads)
STRATEGIES: tuple[Strategy, ...] = ("blue-green", "hold")
AppDeps = Literal["wheelhouse", "system"]  # system: the host's own site-packages (a CUDA torch installed there)
PROCESS_MANAGERS: tuple[ProcessManager, ...] = ("systemd", "supervise")
APP_DEPS: tuple[AppDeps, ...] = ("wheelhouse", "system")
C = TypeVar("C", bound=str)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Target:
    host: Host
    port: int = 8000  # the front proxy's: what clients use
    instance_ports: tuple[int, int] = (8001, 8002)  # the app's two instances, on loopback behind the proxy
    rollout: Strategy = "blue-green"
    model: str = "demo"
    ready_timeout: float = 300.0
    hold_timeout: float = 300.0  # hold: how long the proxy holds a request while no instance is ready (default: ready_timeout)
    drain_seconds: float = 30.0  # how long a stopping instance may take to finish its running requests
    keep_releases: int = 3
    secrets: tuple[str, ...] = ()  # names of variables copied from this machine's environment into the host's 0600 env file
    app_env: dict[str, str] = field(default_factory=dict)  # plain settings for the app (BAKEHOUSE_MAX_BATCH, …)
    # bare hosts
    process_manager: ProcessManager = "systemd"
    service: str = "bakehouse"
    app_deps: AppDeps = "wheelhouse"
    # docker hosts
    engine: ContainerEngine = "docker"
    container: str = "bakehouse"
    image: str | None = None  # repository without tag; default: the registry's bakehouse image
    gpus: str = ""  # "all", "0,1", or "" for none
    models_volume: bool = True  # mount models_dir at /models (False: the image has its models baked)
    container_uid: int = 10001  # the image's user, who must be able to write the models volume
    # webhook targets
    hook_url_env: str = ""

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def prefix(self) -> str:
        return self.host.prefix

    @property
    def stop_timeout(self) -> int:
        """What stopping an instance waits for: its drain, the deregistration second, and the release of the model."""
        return int(self.drain_seconds) + 15


def target(host: Host, default_model: str) -> Target:
    """The host's deploy variables, each checked: a value that could become an option, a path or a line of shell never gets through."""
    v = host.vars
    port = _int(host, v, "port", 8000, 1, 65535)
    ready_timeout = float(_int(host, v, "ready_timeout", 300, 1, 86400))
    t = Target(
        host=host,
        port=port,
        instance_ports=_instance_ports(host, v, port),
        rollout=_choice(host, v, "rollout", STRATEGIES),
        model=_match(host, v, "model", NAME, default_model),
        ready_timeout=ready_timeout,
        hold_timeout=float(_int(host, v, "hold_timeout", int(ready_timeout), 1, 86400)),
        drain_seconds=float(_int(host, v, "drain_seconds", 30, 0, 86400)),
        keep_releases=_int(host, v, "keep_releases", 3, 2, 1000),
        secrets=tuple(_env_name(host, "secrets", x) for x in _list(host, v, "secrets")),
        app_env=_app_env(host, v.get("app_env")),
        process_manager=_choice(host, v, "process_manager", PROCESS_MANAGERS),
        service=_match(host, v, "service", _UNIT_NAME, "bakehouse"),
        app_deps=_choice(host, v, "app_deps", APP_DEPS),
        engine=_choice(host, v, "engine", ENGINES),
        container=_match(host, v, "container", _CONTAINER_NAME, "bakehouse"),
        image=_match(host, v, "image", _IMAGE_REPO, None),
        gpus=_match(host, v, "gpus", _GPUS, ""),
        models_volume=_bool(host, v, "models_volume", True),
        container_uid=_int(host, v, "container_uid", 10001, 0, 2**31 - 1),
        hook_url_env=_env_name(host, "hook_url_env", v["hook_url_env"]) if v.get("hook_url_env") else "",
    )
    if host.runtime == "webhook" and not t.hook_url_env:
        raise ConfigError(f"{host.name}: a webhook target needs hook_url_env: the name of the environment variable that holds the deploy hook URL.")
    return t


_UNIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}\Z")
_CONTAINER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_IMAGE_REPO = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)*\Z")  # a repository without tag, optionally with a registry host
_GPUS = re.compile(r"^(|all|none|[A-Za-z0-9][A-Za-z0-9-]*(,[A-Za-z0-9][A-Za-z0-9-]*)*)\Z")


def _instance_ports(host: Host, v: dict[str, Any], port: int) -> tuple[int, int]:
    """Two loopback ports for the app's instances: `instance_ports: [A, B]`, else the two ports after the public one."""
    default = [port + 1, port + 2] if port <= 65533 else [port - 2, port - 1]
    value = v.get("instance_ports", default)
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError(f"{host.name}: instance_ports must be a list of two port numbers, not {value!r}.")
    a, b = (_int(host, {"instance_ports": x}, "instance_ports", 0, 1, 65535) for x in value)
    if len({a, b, port}) != 3:
        raise ConfigError(f"{host.name}: instance_ports {[a, b]} must be two different ports, neither of them the public port {port}.")
    return a, b


def _int(host: Host, v: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = v.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().isdigit() or not low <= int(value) <= high:
        raise ConfigError(f"{host.name}: {key} must be a number (whole, at least {low}, at most {high}), not {value!r}.")
    return int(value)


def _bool(host: Host, v: dict[str, Any], key: str, default: bool) -> bool:
    value = v.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{host.name}: {key} must be true or false, not {value!r}.")
    return value


def _match(host: Host, v: dict[str, Any], key: str, pattern: re.Pattern[str], default: str | None) -> Any:
    value = v.get(key, default)
    if value is None or (isinstance(value, str) and pattern.match(value)):
        return value
    raise ConfigError(f"{host.name}: {key} {value!r} is not a valid {key} (letters, digits and a few of ._-@:/, starting with a letter or digit).")


def _env_name(host: Host, key: str, name: object) -> str:
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ConfigError(f"{host.name}: {name!r} is not an environment variable name ({key}).")
    return name


# app_env is an allow-list: the app's and its libraries' settings. A deny-list of loader and interpreter variables
# (LD_PRELOAD, PYTHONPATH, PYTHONWARNINGS with a module, BROWSER, PATH, …) would miss the next one.
APP_ENV_PREFIXES = ("BAKEHOUSE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "VLLM_", "OMP_", "MKL_", "KMP_", "CUDA_", "NCCL_", "PYTORCH_")
APP_ENV_NAMES = ("TZ", "LANG", "LC_ALL")


def _app_env(host: Host, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(x, str | int | float | bool) for x in value.values()):
        raise ConfigError(f"{host.name}: app_env must map variable names to plain values (strings or numbers).")
    env = {_env_name(host, "app_env", k): str(x) for k, x in value.items()}
    for k, x in env.items():
        if not (k.startswith(APP_ENV_PREFIXES) or k in APP_ENV_NAMES):
            raise ConfigError(f"{host.name}: app_env {k} is not an app setting; app_env takes {', '.join(p + '*' for p in APP_ENV_PREFIXES)}, "
                              f"{', '.join(APP_ENV_NAMES)}. Variables that change how programs load or start are refused.")
        if x.splitlines() not in ([], [x]) or "\0" in x:
            raise ConfigError(f"{host.name}: app_env {k} holds a line break (or a line or paragraph separator) or a NUL; an env file cannot carry it.")
    return env


def _choice(host: Host, v: dict[str, Any], key: str, choices: tuple[C, ...]) -> C:
    value = str(v.get(key, choices[0]))
    if value not in choices:
        raise ConfigError(f"{host.name}: {key} {value!r} is not one of {', '.join(choices)}.")
    return next(c for c in choices if c == value)


def _list(host: Host, v: dict[str, Any], key: str) -> list[Any]:
    value = v.get(key) or []
    if not isinstance(value, list):
        raise ConfigError(f"{host.name}: {key} must be a list of names.")
    return value
