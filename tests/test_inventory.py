"""The Ansible-compatible inventory, as plain data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ops.errors import ConfigError
from ops.remote.inventory import load_inventory, parse_inventory
from testbed.helpers import ROOT

P = Path("hosts.yml")
DATA = yaml.safe_load("""
all:
  vars: {ansible_user: deploy, models_dir: /data/models}
  hosts:
    lone: {ansible_host: 10.0.0.9}
  children:
    gpu:
      vars: {runtime: bare, ansible_port: 2222}
      hosts:
        g1: {ansible_host: 10.0.0.1}
        g2: {ansible_host: 10.0.0.2, ansible_port: 22, models_dir: /nvme/models}
      children:
        a100:
          hosts:
            g3: {ansible_host: 10.0.0.3, ansible_ssh_private_key_file: ~/.ssh/fleet}
    docker_hosts:
      hosts:
        d1: {runtime: docker}
""")


def test_variables_flow_from_all_through_groups_to_hosts() -> None:
    inv = parse_inventory(DATA, P)
    g1, g2, g3 = inv.hosts["g1"], inv.hosts["g2"], inv.hosts["g3"]
    assert (g1.address, g1.port, g1.user, g1.models_dir) == ("10.0.0.1", 2222, "deploy", "/data/models")
    assert (g2.port, g2.models_dir) == (22, "/nvme/models")
    assert (g3.port, g3.key_file, g3.groups) == (2222, "~/.ssh/fleet", ("a100", "gpu"))
    assert inv.hosts["d1"].runtime == "docker" and inv.hosts["lone"].runtime == "bare"


def test_groups_include_their_children() -> None:
    inv = parse_inventory(DATA, P)
    assert [h.name for h in inv.select(group="gpu")] == ["g1", "g2", "g3"]
    assert [h.name for h in inv.select(hosts=["d1", "lone"])] == ["d1", "lone"]
    assert set(inv.groups["all"]) == {"lone", "g1", "g2", "g3", "d1"}


@pytest.mark.parametrize(("kwargs", "needle"), [({"group": "nope"}, "no group 'nope'"), ({"hosts": ["x"]}, "no host 'x'"), ({}, "--hosts"),
                                               ({"hosts": ["g1"], "group": "gpu"}, "not both")])
def test_bad_selection(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_inventory(DATA, P).select(**kwargs)


def test_bad_runtime_is_refused() -> None:
    with pytest.raises(ConfigError, match="runtime 'k8s'"):
        parse_inventory({"all": {"hosts": {"h": {"runtime": "k8s"}}}}, P)


def test_the_shipped_example_inventory_loads() -> None:
    inv = load_inventory(ROOT / "inventory" / "hosts.yml")
    assert inv.select(group="gpu")


def test_peer_settings_are_typed() -> None:
    inv = parse_inventory({"all": {"vars": {"peer_max_rate": 1000}, "hosts": {"a": {}, "b": {"peers": False}}}}, P)
    assert (inv.hosts["a"].peers, inv.hosts["a"].peer_max_rate, inv.hosts["b"].peers) == (True, 1000, False)
    for bad, needle in (({"peers": "no"}, "peers must be true or false"), ({"peer_max_rate": "fast"}, "peer_max_rate"), ({"peer_max_rate": -1}, "peer_max_rate")):
        with pytest.raises(ConfigError, match=needle):
            parse_inventory({"all": {"hosts": {"h": bad}}}, P)
