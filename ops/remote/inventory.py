"""An Ansible-compatible YAML inventory: `all`, `children`, `hosts`, `vars`.

bakehouse reads the connection variables Ansible uses (`ansible_host`,
`ansible_port`, `ansible_user`, `ansible_ssh_private_key_file`) and its own
host variables (`runtime`, `models_dir`, `python`, `prefix`). Variables apply
from `all` down through each group to the host; the most specific wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ops.errors import ConfigError

Runtime = Literal["bare", "docker", "webhook"]
RUNTIMES: tuple[Runtime, ...] = ("bare", "docker", "webhook")
DEFAULT_INVENTORY = Path("inventory/hosts.yml")


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    port: int = 22
    user: str = "root"
    key_file: str | None = None
    runtime: Runtime = "bare"
    models_dir: str = "/srv/models"
    python: str = "python3"
    prefix: str = "/opt/bakehouse"
    groups: tuple[str, ...] = ()
    vars: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Inventory:
    path: Path
    hosts: dict[str, Host]
    groups: dict[str, tuple[str, ...]]

    def select(self, hosts: list[str] | None = None, group: str | None = None) -> list[Host]:
        if hosts and group:
            raise ConfigError("pass --hosts or --group, not both.")
        if group:
            if group not in self.groups:
                raise ConfigError(f"{self.path}: no group {group!r}. Groups: {', '.join(sorted(self.groups)) or 'none'}.")
            return [self.hosts[h] for h in self.groups[group]]
        if hosts:
            unknown = [h for h in hosts if h not in self.hosts]
            if unknown:
                raise ConfigError(f"{self.path}: no host {unknown[0]!r}. Hosts: {', '.join(sorted(self.hosts))}.")
            return [self.hosts[h] for h in hosts]
        raise ConfigError("no hosts selected: pass --hosts h1,h2 or --group G (see inventory/hosts.yml).")


def load_inventory(path: Path) -> Inventory:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: inventory not found. Pass --inventory FILE (default {DEFAULT_INVENTORY}).") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}. Fix that line and re-run.") from exc
    return parse_inventory(data or {}, path)


def parse_inventory(data: dict[str, Any], path: Path) -> Inventory:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an inventory is a mapping of groups (all, children, hosts, vars).")
    root = (data["all"] or {}) if "all" in data else {"children": data}
    host_vars: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    _walk("all", root, {}, host_vars, groups, path)
    hosts = {name: _host(name, v, tuple(g for g, members in groups.items() if name in members and g != "all"), path) for name, v in host_vars.items()}
    return Inventory(path=path, hosts=hosts, groups={g: tuple(m) for g, m in groups.items()})


def _walk(group: str, node: dict[str, Any], inherited: dict[str, Any], host_vars: dict[str, dict[str, Any]], groups: dict[str, list[str]], path: Path) -> list[str]:
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: group {group!r} must be a mapping with hosts, vars or children.")
    scope = {**inherited, **(node.get("vars") or {})}
    members: list[str] = []
    for name, hvars in (node.get("hosts") or {}).items():
        host_vars[name] = {**host_vars.get(name, {}), **scope, **(hvars or {})}
        members.append(name)
    for child, child_node in (node.get("children") or {}).items():
        members += _walk(child, child_node or {}, scope, host_vars, groups, path)
    groups[group] = list(dict.fromkeys(groups.get(group, []) + members))
    return members


def _host(name: str, v: dict[str, Any], groups: tuple[str, ...], path: Path) -> Host:
    runtime = v.get("runtime", "bare")
    if runtime not in RUNTIMES:
        raise ConfigError(f"{path}: host {name!r}: runtime {runtime!r} is not one of {', '.join(RUNTIMES)}.")
    try:
        port = int(v.get("ansible_port", 22))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: host {name!r}: ansible_port must be a number.") from exc
    return Host(
        name=name,
        address=str(v.get("ansible_host", name)),
        port=port,
        user=str(v.get("ansible_user", "root")),
        key_file=v.get("ansible_ssh_private_key_file"),
        runtime=runtime,
        models_dir=str(v.get("models_dir", "/srv/models")),
        python=str(v.get("python", "python3")),
        prefix=str(v.get("prefix", "/opt/bakehouse")),
        groups=groups,
        vars=v,
    )
