"""Bare-host deploys on hosts with systemd as PID 1 (the default process manager), each host a podman container booted with /sbin/init.

The app runs as a real systemd unit: deploys restart it, a crash shows the
unit's journal, a rollback restarts the previous release with the
configuration it ran with, and after the host reboots the enabled unit brings
the app back without bakehouse.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ops.net import free_port
from testbed.containers import podman
from testbed.helpers import HF_DEMO, ROOT, TOKEN, Hub, Project, manifest
from testbed.load import Load
from testbed.sshhosts import client_keys, trust_host_key

pytestmark = pytest.mark.hosts

HOST_IMAGE = "localhost/bakehouse-systemdhost:bookworm"
PREFIX = "/opt/bakehouse"
SECRET = "systemd-secret-1a2b3c"
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


@dataclass
class SystemdHost:
    name: str
    container: str
    ssh_port: int
    app_port: int  # the front proxy's
    instance_ports: tuple[int, int]

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.container, *argv, check=check)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    subprocess.run([str(ROOT / "scripts" / "make-base-image.sh"), HOST_IMAGE, "openssh-server", "systemd", "systemd-sysv"], check=True)
    return client_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def host(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdHost]:
    ssh_port, app_port = free_port(), free_port()
    conf = tmp_path_factory.mktemp("sshd") / "bakehouse.conf"
    conf.write_text(f"Port {ssh_port}\nListenAddress 127.0.0.1\nAuthorizedKeysFile /keys/authorized_keys\nPermitRootLogin prohibit-password\n"
                    "PasswordAuthentication no\nUsePAM no\nStrictModes no\n")
    container = f"bakehouse-systemd-{ssh_port}"
    podman("run", "-d", "--name", container, "--systemd=always", "--network", "host", "-v", f"{keys}:/keys:ro",
           "-v", f"{conf}:/etc/ssh/sshd_config.d/bakehouse.conf:ro", HOST_IMAGE, "/sbin/init")
    h = SystemdHost("sd1", container, ssh_port, app_port, (free_port(), free_port()))
    try:
        assert trust_host_key(ssh_port, keys, timeout=90), podman("logs", container, check=False).stdout
        assert h.exec("ps", "-p", "1", "-o", "comm=").stdout.strip() == "systemd"
        yield h
    finally:
        podman("rm", "-f", "-t", "5", container, check=False)


@pytest.fixture(scope="module")
def site(hub: Hub, tmp_path_factory: pytest.TempPathFactory, keys: Path, host: SystemdHost) -> Project:
    p = Project(tmp_path_factory.mktemp("systemd") / "project", hub.endpoint)
    p.dir.mkdir()
    p.write_manifest('default = ["demo"]\n\n' + manifest(demo=HF_DEMO))
    assert p.run("lock").returncode == 0
    write_inventory(p.dir / "hosts.yml", keys, host)
    return p


def write_inventory(path: Path, keys: Path, host: SystemdHost, app_env: str = "", rollout: str = "blue-green") -> Path:
    a, b = host.instance_ports
    path.write_text("\n".join([
        "all:", "  hosts:", f"    {host.name}:", "      ansible_host: 127.0.0.1", f"      ansible_port: {host.ssh_port}",
        f"      ansible_ssh_private_key_file: {keys / 'id'}", "      runtime: bare", f"      port: {host.app_port}", f"      instance_ports: [{a}, {b}]",
        "      ready_timeout: 240", f"      rollout: {rollout}", "      secrets: [APP_SECRET]", *([f"      app_env: {{{app_env}}}"] if app_env else []), "",
    ]))
    return path


def deploy(site: Project, keys: Path, command: str, *flags: str, inventory: str = "hosts.yml", search_root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "invoke", "--search-root", str(search_root), command, "--inventory", inventory, "--known-hosts", str(keys / "known_hosts"),
            "--hosts", "sd1", *flags]
    return subprocess.run(argv, cwd=site.dir, env=site.env(HF_TOKEN=TOKEN, APP_SECRET=SECRET), capture_output=True, text=True, timeout=900, check=False)


def row(out: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith("sd1 "))


def ready(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code
    except httpx.TransportError:
        return 0


def serving(site: Project, keys: Path, host: SystemdHost, *versions: str) -> None:
    """Nothing deployed, then `versions` in order (the dependency venvs stay): each test sets up its own history."""
    units = " ".join(f"bakehouse@{p}" for p in host.instance_ports)
    host.exec("sh", "-c", f"systemctl disable --now {units} bakehouse-proxy 2>/dev/null; rm -rf {PREFIX}/releases {PREFIX}/current {PREFIX}/history "
                          f"{PREFIX}/deploy.lock {PREFIX}/instances {PREFIX}/active {PREFIX}/proxy", check=False)
    for version in versions:
        r = deploy(site, keys, "deploy", "--tag", version)
        assert r.returncode == 0, r.stdout + r.stderr


def test_the_app_is_a_systemd_unit_that_comes_back_after_a_host_restart(site: Project, keys: Path, host: SystemdHost) -> None:
    serving(site, keys, host)
    r = deploy(site, keys, "deploy", "--tag", "v1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert row(r.stdout)[:5] == ["sd1", "bare", "-", "v1", "deployed"]
    assert ready(host.app_port) == 200
    instance = f"bakehouse@{host.instance_ports[0]}"
    for unit in (instance, "bakehouse-proxy"):
        assert host.exec("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
        assert host.exec("systemctl", "is-active", unit).stdout.strip() == "active"
    unit = host.exec("systemctl", "cat", instance).stdout
    assert f"EnvironmentFile={PREFIX}/instances/%i/app.env" in unit and SECRET not in unit

    podman("restart", "-t", "10", host.container)
    deadline = time.monotonic() + 240
    while ready(host.app_port) != 200:
        assert time.monotonic() < deadline, host.exec("journalctl", "-u", instance, "-u", "bakehouse-proxy", "-n", "30", "--no-pager", check=False).stdout
        time.sleep(0.5)
    assert trust_host_key(host.ssh_port, keys, timeout=60)


def test_a_release_that_crashes_is_rolled_back_with_its_journal_lines(site: Project, keys: Path, host: SystemdHost, broken_checkout: Path) -> None:
    serving(site, keys, host, "v1")
    r = deploy(site, keys, "deploy", "--tag", "broken", search_root=broken_checkout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert row(r.stdout)[:6] == ["sd1", "bare", "v1", "broken", "rolled", "back"]
    assert "the app exited before it became ready. Last log lines:" in r.stdout and "boom: this release is broken" in r.stdout
    assert ready(host.app_port) == 200


def test_a_rollback_restores_the_configuration_the_previous_release_ran_with(site: Project, keys: Path, host: SystemdHost) -> None:
    serving(site, keys, host, "v1", "v2")
    bad = write_inventory(site.dir / "bad.yml", keys, host, app_env="BAKEHOUSE_MAX_BATCH: many")
    r = deploy(site, keys, "deploy", "--tag", "v3", inventory=bad.name)
    assert r.returncode == 1, r.stdout + r.stderr
    assert row(r.stdout)[:6] == ["sd1", "bare", "v2", "v3", "rolled", "back"] and "BAKEHOUSE_MAX_BATCH" in r.stdout
    assert ready(host.app_port) == 200  # v2 serves again, with v2's settings: not v3's broken ones
    assert "many" not in host.exec("cat", f"{PREFIX}/current/app.env").stdout and "v2" in host.exec("readlink", f"{PREFIX}/current").stdout
    assert "BAKEHOUSE_MAX_BATCH=many" in host.exec("cat", f"{PREFIX}/releases/v3/app.env").stdout

    back = deploy(site, keys, "rollback")
    assert back.returncode == 0, back.stdout + back.stderr
    assert row(back.stdout)[:5] == ["sd1", "bare", "v2", "v1", "reverted"] and ready(host.app_port) == 200
    history = host.exec("cat", f"{PREFIX}/history").stdout
    digests = dict(re.findall(r"^(v\d) config=([0-9a-f]{12})$", history, re.M))
    assert set(digests) == {"v1", "v2"} and SECRET not in history


def test_blue_green_hold_failed_deploy_and_rollback_fail_no_request_under_load(site: Project, keys: Path, host: SystemdHost,
                                                                                broken_checkout: Path) -> None:
    serving(site, keys, host, "v1")
    hold = write_inventory(site.dir / "hold.yml", keys, host, rollout="hold")
    steps = [("deploy", "v2", "hosts.yml", ROOT, "deployed"), ("deploy", "v3", hold.name, ROOT, "deployed"),
             ("deploy", "broken", hold.name, broken_checkout, "rolled"), ("rollback", "", hold.name, ROOT, "reverted")]
    for command, tag, inventory, root, result in steps:
        r, report = Load(f"http://127.0.0.1:{host.app_port}", clients=4).during(
            lambda: deploy(site, keys, command, *(["--tag", tag] if tag else []), inventory=inventory, search_root=root))  # noqa: B023 (called at once)
        assert row(r.stdout)[4] == result, r.stdout + r.stderr
        assert not report.problems(), f"{command} {tag}: {report.problems()}\n{r.stdout}"
    assert "v2" in host.exec("readlink", f"{PREFIX}/current").stdout


def test_deploy_rollback_deploy_within_a_minute(site: Project, keys: Path, host: SystemdHost) -> None:
    """Each start of an instance is deliberate: the units' start limit (for crash loops) never refuses the third one in a minute."""
    serving(site, keys, host, "v1", "v2")
    started = time.monotonic()
    for command, flags, result in (("rollback", [], "reverted"), ("deploy", ["--tag", "v2"], "deployed"), ("rollback", [], "reverted"),
                                   ("deploy", ["--tag", "v2"], "deployed")):
        r = deploy(site, keys, command, *flags)
        assert r.returncode == 0 and row(r.stdout)[4] == result, r.stdout + r.stderr
    elapsed = time.monotonic() - started
    assert ready(host.app_port) == 200
    assert elapsed < 120, f"four switches took {elapsed:.0f}s: each instance was started twice, but not within the start limit's minute"
