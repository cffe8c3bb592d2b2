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
from ops.remote.inventory import Host

ProcessManager = Literal["systemd", "supervise"]
AppDeps = Literal["wheelhouse", "system"]  # system: the host's own site-packages (a CUDA torch installed there)
PROCESS_MANAGERS: tuple[ProcessManager, ...] = ("systemd", "supervise")
APP_DEPS: tuple[AppDeps, ...] = ("wheelhouse", "system")
C = TypeVar("C", bound=str)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Target:
    host: Host
    port: int = 8000
    model: str = "demo"
    ready_timeout: float = 300.0
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


def target(host: Host, default_model: str) -> Target:
    v = host.vars
    t = Target(
        host=host,
        port=_int(host, v, "port", 8000),
        model=str(v.get("model", default_model)),
        ready_timeout=float(_int(host, v, "ready_timeout", 300)),
        keep_releases=_int(host, v, "keep_releases", 3),
        secrets=tuple(_list(host, v, "secrets")),
        app_env={str(k): str(val) for k, val in (v.get("app_env") or {}).items()},
        process_manager=_choice(host, v, "process_manager", PROCESS_MANAGERS),
        service=str(v.get("service", "bakehouse")),
        app_deps=_choice(host, v, "app_deps", APP_DEPS),
        engine=_choice(host, v, "engine", ENGINES),
        container=str(v.get("container", "bakehouse")),
        image=v.get("image"),
        gpus=str(v.get("gpus", "")),
        models_volume=bool(v.get("models_volume", True)),
        container_uid=_int(host, v, "container_uid", 10001),
        hook_url_env=str(v.get("hook_url_env", "")),
    )
    for name in (*t.secrets, *t.app_env):
        if not _ENV_NAME.match(name):
            raise ConfigError(f"{host.name}: {name!r} is not an environment variable name (secrets, app_env).")
    if t.keep_releases < 2:
        raise ConfigError(f"{host.name}: keep_releases must be at least 2, so the previous release stays for rollback.")
    if host.runtime == "webhook" and not t.hook_url_env:
        raise ConfigError(f"{host.name}: a webhook target needs hook_url_env: the name of the environment variable that holds the deploy hook URL.")
    return t


def _int(host: Host, v: dict[str, Any], key: str, default: int) -> int:
    try:
        return int(v.get(key, default))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{host.name}: {key} must be a number, not {v.get(key)!r}.") from exc


def _choice(host: Host, v: dict[str, Any], key: str, choices: tuple[C, ...]) -> C:
    value = str(v.get(key, choices[0]))
    if value not in choices:
        raise ConfigError(f"{host.name}: {key} {value!r} is not one of {', '.join(choices)}.")
    return next(c for c in choices if c == value)


def _list(host: Host, v: dict[str, Any], key: str) -> list[str]:
    value = v.get(key) or []
    if not isinstance(value, list):
        raise ConfigError(f"{host.name}: {key} must be a list of names.")
    return [str(x) for x in value]
