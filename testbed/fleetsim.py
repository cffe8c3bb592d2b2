"""A simulated fleet: many light hosts on this machine, for tests and benchmarks past a handful of hosts.

Each host is an sshd on a loopback port of its own; a few podman containers
hold many of them (one sshd per port), and each host has its own prefix and
models_dir inside its container. All hosts share one venv (a directory of
this machine mounted in every container), bootstrapped once with the fleet's
own argv (their markers say `unchanged`): what 100 already-bootstrapped GPU
nodes look like to the controller.
"""

from __future__ import annotations

import math
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ops.net import free_port
from ops.remote import commands as rc
from ops.remote.inventory import Host
from ops.remote.wheelhouse import build_wheelhouse
from testbed.containers import podman
from testbed.sshhosts import HOST_IMAGE, ensure_host_image, trust_host_key


@dataclass(frozen=True)
class SimHost:
    name: str
    container: str
    port: int

    @property
    def prefix(self) -> str:
        return f"/fleet/{self.name}"


@dataclass
class SimFleet:
    hosts: list[SimHost]
    containers: list[str]
    shared: Path | None = None  # the venv every container mounts at /fleet/shared

    def stop(self) -> None:
        if self.containers:
            podman("rm", "-f", "-t", "1", *self.containers, check=False)
        if self.shared is not None:
            shutil.rmtree(self.shared, ignore_errors=True)

    def inventory(self, path: Path, keys: Path, *, group: str = "sim", down: int = 0) -> Path:
        lines = ["all:", "  vars:", "    ansible_user: root", f"    ansible_ssh_private_key_file: {keys / 'id'}", "  children:", f"    {group}:", "      hosts:"]
        for h in self.hosts:
            lines += [f"        {h.name}: {{ansible_host: 127.0.0.1, ansible_port: {h.port}, prefix: {h.prefix}, models_dir: {h.prefix}/models}}"]
        lines += [f"        down{i}: {{ansible_host: 127.0.0.1, ansible_port: {free_port()}}}" for i in range(down)]
        path.write_text("\n".join(lines) + "\n")
        return path


def start_fleet(count: int, keys: Path, *, per_container: int = 25) -> SimFleet:
    ensure_host_image()
    wh = build_wheelhouse()
    fleet = SimFleet([], [], Path(tempfile.mkdtemp(prefix="bakehouse-fleet-")))
    try:
        for c in range(math.ceil(count / per_container)):
            names = [f"sim{i:03d}" for i in range(c * per_container, min(count, (c + 1) * per_container))]
            fleet.hosts += _container(fleet, names, keys, wh, install=c == 0)
    except BaseException:
        fleet.stop()
        raise
    return fleet


def _container(fleet: SimFleet, names: list[str], keys: Path, wh: object, *, install: bool) -> list[SimHost]:
    ports = [free_port() for _ in names]
    container = f"bakehouse-sim-{ports[0]}"
    options = "-o ListenAddress=127.0.0.1 -o AuthorizedKeysFile=/keys/authorized_keys -o PermitRootLogin=prohibit-password -o UsePAM=no " \
              "-o StrictModes=no -o PasswordAuthentication=no -o MaxStartups=100"
    daemons = " && ".join(f"/usr/sbin/sshd -p {p} {options}" for p in ports)
    script = f"mkdir -p /run/sshd && ssh-keygen -A >/dev/null && {daemons} && exec sleep infinity"
    podman("run", "-d", "--name", container, "--network", "host", "-v", f"{keys}:/keys:ro", "-v", f"{fleet.shared}:/fleet/shared", HOST_IMAGE, "sh", "-c", script)
    fleet.containers.append(container)
    hosts = [SimHost(n, container, p) for n, p in zip(names, ports, strict=True)]
    if install:
        # One venv for the fleet, installed with its own bootstrap argv in the first container (all run the same image); every host's prefix links to it.
        shared = Host(name="shared", address="127.0.0.1", prefix="/fleet/shared")
        boot = rc.bootstrap(shared, wh.wheels, wh.digest)  # type: ignore[attr-defined]
        podman("exec", container, *boot.mkdir)
        for wheel in wh.wheels:  # type: ignore[attr-defined]
            podman("cp", str(wh.directory / wheel), f"{container}:{boot.wheelhouse}/{wheel}")  # type: ignore[attr-defined]
        for argv in (boot.venv, boot.install, boot.mark):
            podman("exec", container, *argv, timeout=900)
    links = " && ".join(f"mkdir -p {h.prefix}/models && ln -s /fleet/shared/venv {h.prefix}/venv" for h in hosts)
    podman("exec", container, "sh", "-c", links)
    for h in hosts:
        if not trust_host_key(h.port, keys, timeout=60):
            raise RuntimeError(f"sshd for {h.name} on port {h.port} did not come up: {shlex.quote(podman('logs', container, check=False).stderr)}")
    return hosts
