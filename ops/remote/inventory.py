"""An Ansible-compatible YAML inventory: `all`, `children`, `hosts`, `vars`.

bakehouse reads the connection variables Ansible uses (`ansible_host`,
`ansible_port`, `ansible_user`, `ansible_ssh_private_key_file`) and its own
host variables (`runtime`, `models_dir`, `python`, `prefix`). Variables apply
from `all` down through each group to the host; the most specific wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ops.errors import ConfigError
from ops.settings import read_text

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
    peers: bool = True  # --fan-out peers: false when the host cannot reach the others (it gets files through the controller)
    peer_max_rate: int = 0  # --fan-out peers: bytes a second this host sends to each peer (0: no limit)
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


_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_ADDRESS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_%-]{0,252}\Z")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]{0,63}\Z")
_ABS_PATH = re.compile(r"^/[A-Za-z0-9._/@+-]*\Z")
_COMMAND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
_MAX_NODES = 100_000  # an alias-laden YAML file could otherwise make the walk exponential


def check_path(where: str, key: str, value: object) -> str:
    """An absolute path on a host: letters, digits and ._/@+- only, no '..' (it reaches argv, a systemd unit and sh scripts)."""
    if not isinstance(value, str) or not _ABS_PATH.match(value) or value == "/" or ".." in value.split("/"):
        raise ConfigError(f"{where}: {key} {value!r} must be an absolute path of letters, digits and ._/@+- (no '..', not /).")
    return value.rstrip("/") or value


# libyaml's safe loader when PyYAML has it: 8x faster than the Python one on a 200-host inventory, with a nesting limit.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_inventory(path: Path) -> Inventory:
    """Parse and validate the inventory. Any bytes in: an Inventory or a ConfigError out."""
    text = read_text(path, ConfigError, "an inventory", f"Pass --inventory FILE (default {DEFAULT_INVENTORY}).")
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}. Fix that line and re-run.") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: nested too deeply to be an inventory.") from exc
    return parse_inventory(data if data is not None else {}, path)


def parse_inventory(data: Any, path: Path) -> Inventory:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an inventory is a mapping of groups (all, children, hosts, vars).")
    root = (data["all"] or {}) if "all" in data else {"children": data}
    host_vars: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    try:
        _walk("all", root, {}, host_vars, groups, path, [0])
    except RecursionError as exc:
        raise ConfigError(f"{path}: groups nested too deeply.") from exc
    hosts = {name: _host(name, v, tuple(g for g, members in groups.items() if name in members and g != "all"), path) for name, v in host_vars.items()}
    return Inventory(path=path, hosts=hosts, groups={g: tuple(m) for g, m in groups.items()})


def _mapping(value: Any, where: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}.")
    return value


def _walk(group: Any, node: Any, inherited: dict[str, Any], host_vars: dict[str, dict[str, Any]], groups: dict[str, list[str]], path: Path, seen: list[int]) -> list[str]:
    where = f"{path}: group {group!r}"
    if not isinstance(group, str) or not _HOST_NAME.match(group):
        raise ConfigError(f"{where}: group names use letters, digits, '.', '_' and '-'.")
    seen[0] += 1
    if seen[0] > _MAX_NODES:
        raise ConfigError(f"{path}: more than {_MAX_NODES} groups and hosts once aliases are expanded; simplify the inventory.")
    node = _mapping(node, where)
    scope = {**inherited, **_mapping(node.get("vars"), f"{where} vars")}
    members: list[str] = []
    for name, hvars in _mapping(node.get("hosts"), f"{where} hosts").items():
        if not isinstance(name, str) or not _HOST_NAME.match(name):
            raise ConfigError(f"{where}: host name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit.")
        seen[0] += 1
        host_vars[name] = {**host_vars.get(name, {}), **scope, **_mapping(hvars, f"{path}: host {name!r}")}
        members.append(name)
    for child, child_node in _mapping(node.get("children"), f"{where} children").items():
        members += _walk(child, child_node, scope, host_vars, groups, path, seen)
    groups[group] = list(dict.fromkeys(groups.get(group, []) + members))
    return members


def _host(name: str, v: dict[str, Any], groups: tuple[str, ...], path: Path) -> Host:
    where = f"{path}: host {name!r}"
    runtime = v.get("runtime", "bare")
    if runtime not in RUNTIMES:
        raise ConfigError(f"{where}: runtime {runtime!r} is not one of {', '.join(RUNTIMES)}.")
    port = v.get("ansible_port", 22)
    if isinstance(port, bool) or not isinstance(port, int | str) or not str(port).isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where}: ansible_port must be a number from 1 to 65535, not {port!r}.")
    address, user = v.get("ansible_host", name), v.get("ansible_user", "root")
    if not isinstance(address, str) or not _ADDRESS.match(address):
        raise ConfigError(f"{where}: ansible_host {address!r} must be a host name or an IP address.")
    if not isinstance(user, str) or not _USER.match(user):
        raise ConfigError(f"{where}: ansible_user {user!r} must be a user name (letters, digits, '.', '_', '-').")
    key = v.get("ansible_ssh_private_key_file")
    if key is not None and (not isinstance(key, str) or not key or any(ord(c) < 32 for c in key)):
        raise ConfigError(f"{where}: ansible_ssh_private_key_file {key!r} must be a file path.")
    python = v.get("python", "python3")
    if not isinstance(python, str) or not (_COMMAND.match(python) or _ABS_PATH.match(python)) or ".." in python.split("/"):
        raise ConfigError(f"{where}: python {python!r} must be a command name (python3) or an absolute path.")
    peers, max_rate = v.get("peers", True), v.get("peer_max_rate", 0)
    if not isinstance(peers, bool):
        raise ConfigError(f"{where}: peers must be true or false, not {peers!r}.")
    if isinstance(max_rate, bool) or not isinstance(max_rate, int) or not 0 <= max_rate <= 10**12:
        raise ConfigError(f"{where}: peer_max_rate must be bytes a second (a whole number, 0 for no limit), not {max_rate!r}.")
    return Host(
        name=name,
        address=address,
        port=int(port),
        user=user,
        key_file=key,
        runtime=runtime,
        models_dir=check_path(where, "models_dir", v.get("models_dir", "/srv/models")),
        python=python,
        prefix=check_path(where, "prefix", v.get("prefix", "/opt/bakehouse")),
        groups=groups,
        peers=peers,
        peer_max_rate=max_rate,
        vars=v,
    )
