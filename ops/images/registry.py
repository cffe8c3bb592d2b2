"""Registry login and push as data. The password goes on stdin, never in argv."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ops.errors import ConfigError


@dataclass(frozen=True)
class Registry:
    host: str
    user: str
    password: str
    insecure: bool = False

    @classmethod
    def from_env(cls) -> Registry:
        host = os.environ.get("BAKEHOUSE_REGISTRY", "")
        if not host:
            raise ConfigError("no registry configured. Set BAKEHOUSE_REGISTRY (e.g. registry.example.com or 127.0.0.1:5000), BAKEHOUSE_REGISTRY_USER and BAKEHOUSE_REGISTRY_PASSWORD.")
        return cls(
            host=host,
            user=os.environ.get("BAKEHOUSE_REGISTRY_USER", ""),
            password=os.environ.get("BAKEHOUSE_REGISTRY_PASSWORD", ""),
            insecure=os.environ.get("BAKEHOUSE_REGISTRY_INSECURE", "").lower() in ("1", "true", "yes"),
        )

    def __repr__(self) -> str:  # never show the password, even in a traceback
        return f"Registry(host={self.host!r}, user={self.user!r}, insecure={self.insecure})"


def _tls(engine: str, registry: Registry) -> list[str]:
    return ["--tls-verify=false"] if engine == "podman" and registry.insecure else []


def login_argv(engine: str, registry: Registry) -> list[str]:
    return [engine, "login", *_tls(engine, registry), "--username", registry.user, "--password-stdin", registry.host]


def remote_ref(registry: Registry, local: str) -> str:
    return f"{registry.host}/{local.split('/', 1)[-1] if local.startswith('localhost/') else local}"


def tag_argv(engine: str, local: str, remote: str) -> list[str]:
    return [engine, "tag", local, remote]


def push_argv(engine: str, registry: Registry, remote: str) -> list[str]:
    return [engine, "push", *_tls(engine, registry), remote]


@dataclass(frozen=True)
class PushResult:
    uploaded: int
    existing: int


_BLOB = re.compile(r"Copying blob (?:sha256:)?([0-9a-f]{6,})(.*)")


def parse_push(output: str) -> PushResult:
    """Count layers uploaded vs already in the registry, from podman or docker push output."""
    state: dict[str, bool] = {}  # layer -> already in the registry
    for line in output.splitlines():
        m = _BLOB.search(line)
        if m:
            state[m.group(1)] = state.get(m.group(1), False) or "skipped" in m.group(2) or "exists" in m.group(2)
        elif (d := re.match(r"([0-9a-f]{6,}): (Pushed|Layer already exists)", line.strip())) is not None:
            state[d.group(1)] = d.group(2) != "Pushed"
    existing = sum(state.values())
    return PushResult(uploaded=len(state) - existing, existing=existing)
