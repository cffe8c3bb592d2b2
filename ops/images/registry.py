"""Registry login and push as data. The password goes on stdin, never in argv."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import httpx

from ops.errors import ConfigError, redact

_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?\Z")
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*\Z")


@dataclass(frozen=True)
class Registry:
    host: str
    user: str
    password: str
    insecure: bool = False

    @classmethod
    def from_env(cls) -> Registry:
        host, user = os.environ.get("BAKEHOUSE_REGISTRY", ""), os.environ.get("BAKEHOUSE_REGISTRY_USER", "")
        if not host:
            raise ConfigError("no registry configured. Set BAKEHOUSE_REGISTRY (e.g. registry.example.com or 127.0.0.1:5000), "
                              "BAKEHOUSE_REGISTRY_USER and BAKEHOUSE_REGISTRY_PASSWORD.")
        if not _HOST.match(host):
            raise ConfigError(f"BAKEHOUSE_REGISTRY={redact(host)!r} must be a registry host[:port] (registry.example.com, 127.0.0.1:5000), without scheme or credentials.")
        if user and not _USER.match(user):
            raise ConfigError(f"BAKEHOUSE_REGISTRY_USER={user!r} must be a user name (letters, digits and ._@-).")
        return cls(
            host=host,
            user=user,
            password=os.environ.get("BAKEHOUSE_REGISTRY_PASSWORD", ""),
            insecure=os.environ.get("BAKEHOUSE_REGISTRY_INSECURE", "").lower() in ("1", "true", "yes"),
        )

    def __repr__(self) -> str:  # never show the password, even in a traceback
        return f"Registry(host={self.host!r}, user={self.user!r}, insecure={self.insecure})"


def tls_flags(engine: str, registry: Registry) -> list[str]:
    """podman talks plain HTTP to an insecure registry only when told; Docker decides by its daemon's insecure-registries."""
    return ["--tls-verify=false"] if engine == "podman" and registry.insecure else []


def login_argv(engine: str, registry: Registry) -> list[str]:
    """The password goes on stdin, never in argv."""
    return [engine, "login", *tls_flags(engine, registry), "--username", registry.user, "--password-stdin", registry.host]


def remote_ref(registry: Registry, local: str) -> str:
    """The image's name in the registry: a registry part already in the local name (localhost/, another host) is replaced."""
    first, _, rest = local.partition("/")
    if rest and (first == "localhost" or "." in first or ":" in first):
        local = rest
    return f"{registry.host}/{local}"


def tag_argv(engine: str, local: str, remote: str) -> list[str]:
    return [engine, "tag", local, remote]


def push_argv(engine: str, registry: Registry, remote: str) -> list[str]:
    return [engine, "push", *tls_flags(engine, registry), remote]


MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
])


@dataclass(frozen=True)
class PushResult:
    uploaded: int
    uploaded_bytes: int
    existing: int


class RegistryApi:
    """Just enough of the registry v2 API to tell which layers a push really uploaded."""

    def __init__(self, registry: Registry) -> None:
        scheme = "http" if registry.insecure else "https"
        self._base = f"{scheme}://{registry.host}/v2"
        self._verify = not registry.insecure
        self._client = httpx.Client(auth=(registry.user, registry.password) if registry.user else None, timeout=30, verify=self._verify)

    def _get(self, path: str, accept: str = "application/json") -> httpx.Response:
        r = self._client.get(self._base + path, headers={"Accept": accept})
        challenge = r.headers.get("www-authenticate", "")
        if r.status_code == 401 and challenge.lower().startswith("bearer"):
            params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
            token = self._client.get(params.pop("realm"), params=params).json()
            bearer = token.get("token") or token.get("access_token")
            r = httpx.get(self._base + path, headers={"Accept": accept, "Authorization": f"Bearer {bearer}"}, timeout=30, verify=self._verify)
        return r

    def layers(self, repo: str, tag: str) -> dict[str, int]:
        r = self._get(f"/{repo}/manifests/{tag}", MANIFEST_TYPES)
        if r.status_code != 200:
            return {}
        return {layer["digest"]: layer["size"] for layer in r.json().get("layers", [])}

    def known_layers(self, repo: str, limit: int = 100) -> set[str]:
        r = self._get(f"/{repo}/tags/list")
        tags = (r.json().get("tags") or []) if r.status_code == 200 else []
        return {digest for tag in tags[-limit:] for digest in self.layers(repo, tag)}


def split_ref(remote: str) -> tuple[str, str]:
    """`host/repo/name:tag` -> ("repo/name", "tag")."""
    path = remote.split("/", 1)[1]
    repo, _, tag = path.rpartition(":")
    return repo, tag


def compare_layers(pushed: dict[str, int], before: set[str]) -> PushResult:
    new = {d: size for d, size in pushed.items() if d not in before}
    return PushResult(uploaded=len(new), uploaded_bytes=sum(new.values()), existing=len(pushed) - len(new))
