"""Bare hosts for the fleet tests: one podman container per host (its own filesystem), sshd on a loopback port."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ops.net import free_port
from testbed.containers import podman
from testbed.helpers import ROOT
from testbed.proxy import TcpCounter

HOST_IMAGE = "localhost/bakehouse-sshhost:bookworm"


def ensure_host_image() -> str:
    subprocess.run([str(ROOT / "scripts" / "make-base-image.sh"), HOST_IMAGE, "openssh-server"], check=True)
    return HOST_IMAGE


@dataclass
class SshHost:
    name: str
    container: str
    port: int

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.container, *argv, check=check)

    def stop(self) -> None:
        """Stop and remove the container: nothing of a test host outlives the test."""
        podman("rm", "-f", "-t", "1", self.container, check=False)


def trust_host_key(port: int, keys: Path, timeout: float = 30) -> bool:
    """Wait for sshd on the port and record its key in keys/known_hosts, as an operator would after checking it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        scan = subprocess.run(["ssh-keyscan", "-p", str(port), "-T", "2", "127.0.0.1"], capture_output=True, text=True, check=False)
        if scan.stdout.strip():
            with open(keys / "known_hosts", "a") as f:
                f.write(scan.stdout)
            return True
        time.sleep(0.2)
    return False


def start_host(name: str, keys: Path, *, tmpfs_models_mb: int | None = None) -> SshHost:
    port = free_port()
    container = f"bakehouse-{name}-{port}"
    sshd = (
        "mkdir -p /run/sshd && ssh-keygen -A >/dev/null && exec /usr/sbin/sshd -D -e"
        f" -p {port} -o ListenAddress=127.0.0.1 -o AuthorizedKeysFile=/keys/authorized_keys"
        " -o PermitRootLogin=prohibit-password -o UsePAM=no -o StrictModes=no -o PasswordAuthentication=no"
    )
    extra = ["--mount", f"type=tmpfs,destination=/srv/models,tmpfs-size={tmpfs_models_mb}m"] if tmpfs_models_mb else []
    podman("run", "-d", "--name", container, "--network", "host", "-v", f"{keys}:/keys:ro", *extra, HOST_IMAGE, "sh", "-c", sshd)
    if trust_host_key(port, keys):
        return SshHost(name, container, port)
    raise RuntimeError(f"sshd in {container} did not come up: {podman('logs', container, check=False).stderr}")


def client_keys(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / "id")], check=True)
    (directory / "authorized_keys").write_text((directory / "id.pub").read_text())
    (directory / "known_hosts").write_text("")
    return directory


def inventory(path: Path, keys: Path, hosts: list[SshHost], ports: dict[str, int] | None = None) -> Path:
    """`ports`: a host's SSH port when something (a byte-counting relay) sits in front of its sshd."""
    lines = ["all:", "  vars:", "    ansible_user: root", f"    ansible_ssh_private_key_file: {keys / 'id'}", "    models_dir: /srv/models", "  children:",
             "    fleet:", "      hosts:"]
    for h in hosts:
        lines += [f"        {h.name}:", "          ansible_host: 127.0.0.1", f"          ansible_port: {(ports or {}).get(h.name, h.port)}"]
    lines += ["        down:", "          ansible_host: 127.0.0.1", f"          ansible_port: {free_port()}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class LocalSshd:
    """sshd on loopback for this machine itself: a Docker (podman) host for the deploy tests."""

    process: subprocess.Popen
    port: int

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_local_sshd(directory: Path, keys: Path, env: dict[str, str] | None = None) -> LocalSshd:
    """`env` is set for every SSH session (sshd's SetEnv): a Docker host whose daemon listens on a socket of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / "host_key")], check=True)
    (directory / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host_key'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
        f"PidFile {directory / 'sshd.pid'}\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
        + "".join(f"SetEnv {k}={v}\n" for k, v in (env or {}).items())
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(directory / "sshd_config")], stderr=(directory / "sshd.log").open("w"))
    if trust_host_key(port, keys):
        return LocalSshd(proc, port)
    proc.kill()
    raise RuntimeError(f"local sshd did not come up: {(directory / 'sshd.log').read_text()}")


def counted(hosts: list[SshHost], keys: Path) -> dict[str, TcpCounter]:
    """A byte-counting relay in front of each host's sshd, its port trusted with the host's key: what the control machine sends, counted."""
    counters = {h.name: TcpCounter(h.port).start() for h in hosts}
    known = keys / "known_hosts"
    lines = known.read_text().splitlines()
    for h in hosts:
        lines += [line.replace(f"[127.0.0.1]:{h.port} ", f"[127.0.0.1]:{counters[h.name].port} ") for line in lines if line.startswith(f"[127.0.0.1]:{h.port} ")]
    known.write_text("\n".join(lines) + "\n")
    return counters
