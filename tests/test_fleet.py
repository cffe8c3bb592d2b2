"""`invoke fetch-models` / `verify-models` over real SSH on hosts with their own filesystems."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.remote.inventory import Host
from ops.remote.ssh import SshOptions, connect
from testbed.helpers import HF_DEMO, HF_SHARDS, ROOT, TOKEN, Hub, Project, manifest
from testbed.proxy import Proxy
from testbed.sshhosts import SshHost, inventory, start_host

pytestmark = pytest.mark.hosts

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


@pytest.fixture(scope="module")
def hosts(keys: Path) -> Iterator[list[SshHost]]:
    started = [start_host(f"h{i}", keys) for i in (1, 2, 3)]
    yield started
    for h in started:
        h.stop()


@pytest.fixture(scope="module")
def fleet_project(hub: Hub, tmp_path_factory: pytest.TempPathFactory, keys: Path, hosts: list[SshHost]) -> Project:
    p = Project(tmp_path_factory.mktemp("fleet") / "project", hub.endpoint)
    p.dir.mkdir()
    p.write_manifest(manifest(demo=HF_DEMO, shards=HF_SHARDS))
    assert p.run("lock", "--models", "demo,shards").returncode == 0
    inventory(p.dir / "hosts.yml", keys, hosts)
    return p


def fleet(project: Project, keys: Path, command: str, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*INVOKE, command, "--inventory", str(project.dir / "hosts.yml"), "--lock", str(project.dir / "models.lock"), "--known-hosts", str(keys / "known_hosts"), *flags]
    return subprocess.run(argv, env=env or project.env(), capture_output=True, text=True, timeout=600)


def rows(out: str) -> dict[tuple[str, str], str]:
    """Table rows by (host, model), each failed row with its reason (printed after the summary line) appended."""
    lines = out.splitlines()
    summary = next(i for i, line in enumerate(lines) if " host(s), " in line)
    table = {(p[0], p[1]): " ".join(p[2:]) for p in (line.split() for line in lines[1:summary] if line.strip())}
    for reason in lines[summary + 1:]:
        head, _, text = reason.partition(": ")
        host, _, model = head.partition(" ")
        table[(host, model or "-")] += " " + text
    return table


def test_parallel_fetch_then_rerun_changes_nothing(fleet_project: Project, keys: Path, hosts: list[SshHost], hub: Hub) -> None:
    r = fleet(fleet_project, keys, "fetch-models", "--hosts", "h1,h2,h3", "--models", "demo")
    assert r.returncode == 0, r.stdout + r.stderr
    table = rows(r.stdout)
    assert all(table[(h.name, "demo")].startswith("downloaded") for h in hosts), r.stdout
    for h in hosts:
        assert h.exec("/opt/bakehouse/venv/bin/python", "-m", "ops.models", "verify", "--full", "--models", "demo", "--lock", "/opt/bakehouse/models.lock",
                      "--dest", "/srv/models").returncode == 0
    proxy = Proxy(hub.endpoint).start()
    try:
        again = fleet(fleet_project, keys, "fetch-models", "--hosts", "h1,h2,h3", "--models", "demo", "--json", env=fleet_project.env(HF_ENDPOINT=proxy.url))
    finally:
        proxy.stop()
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert [h["bootstrap"] for h in report["hosts"]] == ["unchanged"] * 3
    assert [h["outcomes"][0]["status"] for h in report["hosts"]] == ["up-to-date"] * 3
    assert proxy.requests == []


def test_an_unreachable_host_fails_alone(fleet_project: Project, keys: Path) -> None:
    r = fleet(fleet_project, keys, "fetch-models", "--group", "fleet", "--models", "demo", "--connect-timeout", "3")
    assert r.returncode == 3, r.stdout + r.stderr
    table = rows(r.stdout)
    assert "cannot reach" in table[("down", "-")]
    assert all(table[(h, "demo")] in ("up-to-date", "downloaded") or table[(h, "demo")].startswith(("up-to-date", "downloaded")) for h in ("h1", "h2", "h3"))
    assert "4 host(s), 1 failed" in r.stdout


def test_a_full_disk_fails_on_that_host_and_activates_nothing(fleet_project: Project, keys: Path, hosts: list[SshHost]) -> None:
    small = start_host("h4", keys, tmpfs_models_mb=5)
    try:
        inventory(fleet_project.dir / "hosts.yml", keys, [*hosts, small])
        r = fleet(fleet_project, keys, "fetch-models", "--hosts", "h1,h4", "--models", "shards")
        assert r.returncode == 4, r.stdout + r.stderr
        table = rows(r.stdout)
        assert "need 8.0 MB, have" in table[("h4", "-")] or "need 8.0 MB, have" in table.get(("h4", "shards"), "")
        assert table[("h1", "shards")].startswith("downloaded")
        assert small.exec("test", "-e", "/srv/models/shards/current", check=False).returncode != 0
    finally:
        small.stop()
        inventory(fleet_project.dir / "hosts.yml", keys, hosts)


def test_full_verify_finds_a_corrupted_file_on_one_host(fleet_project: Project, keys: Path, hosts: list[SshHost]) -> None:
    assert fleet(fleet_project, keys, "fetch-models", "--hosts", "h1,h2,h3", "--models", "demo").returncode == 0
    target = "/srv/models/demo/current/model.safetensors"
    flip = (f"import os; p='{target}'; st=os.stat(p); f=open(p,'r+b'); f.seek(4096); b=f.read(1); f.seek(4096); f.write(bytes([b[0]^1])); f.close(); "
            "os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))")
    hosts[1].exec("python3", "-c", flip)
    quick = fleet(fleet_project, keys, "verify-models", "--hosts", "h1,h2,h3", "--models", "demo")
    full = fleet(fleet_project, keys, "verify-models", "--hosts", "h1,h2,h3", "--models", "demo", "--full")
    assert full.returncode == 1, full.stdout + full.stderr
    table = rows(full.stdout)
    assert "model.safetensors: sha256" in table[("h2", "demo")]
    assert table[("h1", "demo")].startswith("verified (full)") and table[("h3", "demo")].startswith("verified (full)")
    assert quick.returncode == 0, quick.stdout  # same size, mtime and inode: quick trusts the stamp, as documented; --full is for this
    assert fleet(fleet_project, keys, "fetch-models", "--hosts", "h2", "--models", "demo").returncode == 0  # repaired


def test_the_token_reaches_no_remote_argv_and_no_remote_file(fleet_project: Project, keys: Path, hosts: list[SshHost], hub: Hub) -> None:
    slow = Proxy(hub.endpoint, total_rate=1_000_000).start()  # about 8 s for the shards: long enough to catch the fetch in `ps` on a busy machine
    env = fleet_project.env(HF_ENDPOINT=slow.url, HF_TOKEN=TOKEN)
    seen: list[str] = []
    try:
        proc = subprocess.Popen([*INVOKE, "fetch-models", "--inventory", str(fleet_project.dir / "hosts.yml"), "--lock", str(fleet_project.dir / "models.lock"),
                                 "--known-hosts", str(keys / "known_hosts"), "--hosts", "h3", "--models", "shards"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            seen.append(hosts[2].exec("ps", "-eo", "args", check=False).stdout)
            time.sleep(0.2)
        out, err = proc.communicate()
    finally:
        slow.stop()
    assert proc.returncode == 0, out + err
    assert any("ops.models fetch" in snapshot for snapshot in seen), "never caught the remote fetch running"
    assert not any(TOKEN in snapshot for snapshot in seen)
    assert any(r.authorization == f"Bearer {TOKEN}" for r in slow.requests)
    assert TOKEN not in out + err
    grep = hosts[2].exec("grep", "-rl", TOKEN, "/opt/bakehouse", "/srv/models", "/root", "/tmp", check=False)
    assert grep.stdout == ""


def test_kill_the_control_process_mid_fetch_then_rerun_converges(fleet_project: Project, keys: Path, hosts: list[SshHost], hub: Hub) -> None:
    for h in hosts:
        h.exec("rm", "-rf", "/srv/models/shards", "/srv/models/.staging/shards")
    slow = Proxy(hub.endpoint, rate=1_000_000).start()
    try:
        env = fleet_project.env(HF_ENDPOINT=slow.url)
        proc = subprocess.Popen([*INVOKE, "fetch-models", "--inventory", str(fleet_project.dir / "hosts.yml"), "--lock", str(fleet_project.dir / "models.lock"),
                                 "--known-hosts", str(keys / "known_hosts"), "--hosts", "h1,h2,h3", "--models", "shards"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and slow.bytes_served(".safetensors") < 3_000_000:
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        slow.stop()
    r = fleet(fleet_project, keys, "fetch-models", "--hosts", "h1,h2,h3", "--models", "shards")
    assert r.returncode == 0, r.stdout + r.stderr
    v = fleet(fleet_project, keys, "verify-models", "--hosts", "h1,h2,h3", "--models", "shards", "--full")
    assert v.returncode == 0, v.stdout


def test_a_command_timeout_fails_that_host_with_the_reason(fleet_project: Project, keys: Path, hosts: list[SshHost], hub: Hub) -> None:
    hosts[0].exec("rm", "-rf", "/srv/models/shards", "/srv/models/.staging/shards")
    slow = Proxy(hub.endpoint, rate=500_000).start()
    try:
        r = fleet(fleet_project, keys, "fetch-models", "--hosts", "h1", "--models", "shards", "--command-timeout", "3", env=fleet_project.env(HF_ENDPOINT=slow.url))
    finally:
        slow.stop()
    assert r.returncode == 3, r.stdout + r.stderr
    assert "did not finish within 3s (--command-timeout)" in rows(r.stdout)[("h1", "-")]
    assert hosts[0].exec("test", "-e", "/srv/models/shards/current", check=False).returncode != 0


def test_the_ansible_engine_honours_the_command_timeout(fleet_project: Project, keys: Path, hosts: list[SshHost], hub: Hub) -> None:
    hosts[0].exec("rm", "-rf", "/srv/models/shards", "/srv/models/.staging/shards")
    fleet(fleet_project, keys, "verify-models", "--hosts", "h1", "--models", "shards")  # bootstrap first: the timeout must cut the fetch
    slow = Proxy(hub.endpoint, rate=500_000).start()
    try:
        r = fleet(fleet_project, keys, "fetch-models", "--hosts", "h1", "--models", "shards", "--engine", "ansible", "--command-timeout", "3",
                  env=fleet_project.env(HF_ENDPOINT=slow.url))
    finally:
        slow.stop()
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Timed out after 3 second(s)" in rows(r.stdout)[("h1", "-")], r.stdout  # ansible's own words: its timeout cut the fetch
    assert hosts[0].exec("test", "-e", "/srv/models/shards/current", check=False).returncode != 0


def test_the_connection_negotiates_aes_gcm_with_openssh(keys: Path, hosts: list[SshHost]) -> None:
    """AES-GCM offered first and taken by OpenSSH: its integrity check runs in C, where AES-CTR's MAC is checked per packet in Python."""
    conn = connect(Host(name="h1", address="127.0.0.1", port=hosts[0].port, key_file=str(keys / "id")), SshOptions(known_hosts=keys / "known_hosts"))
    try:
        assert (conn.transport.local_cipher, conn.transport.remote_cipher) == ("aes128-gcm@openssh.com", "aes128-gcm@openssh.com")
    finally:
        conn.close()


def test_unknown_host_keys_are_refused_unless_first_contact_is_allowed(fleet_project: Project, keys: Path, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    base = [*INVOKE, "verify-models", "--inventory", str(fleet_project.dir / "hosts.yml"), "--lock", str(fleet_project.dir / "models.lock"), "--known-hosts", str(empty),
            "--hosts", "h1,h2,h3", "--models", "demo"]
    strict = subprocess.run(base, env=fleet_project.env(), capture_output=True, text=True)
    assert strict.returncode == 2 and strict.stdout.count("unknown host key") == 3
    first = subprocess.run([*base, "--host-keys", "accept-new"], env=fleet_project.env(), capture_output=True, text=True)  # three first contacts at once
    assert "unknown host key" not in first.stdout, first.stdout + first.stderr
    assert all(rows(first.stdout)[(h, "demo")].startswith(("verified", "FAILED")) for h in ("h1", "h2", "h3")), first.stdout
    assert len(empty.read_text().splitlines()) == 3 and "127.0.0.1" in empty.read_text()  # each host's key recorded, none lost to another's write
    again = subprocess.run(base, env=fleet_project.env(), capture_output=True, text=True)
    assert "unknown host key" not in again.stdout  # recorded: strict accepts them now


def test_fan_out_serves_each_file_once_for_three_hosts(fleet_project: Project, keys: Path, hosts: list[SshHost], hub: Hub, tmp_path: Path) -> None:
    for h in hosts:
        h.exec("rm", "-rf", "/srv/models/shards", "/srv/models/.staging/shards")
    proxy = Proxy(hub.endpoint).start()
    try:
        r = fleet(fleet_project, keys, "fetch-models", "--hosts", "h1,h2,h3", "--models", "shards", "--from-local", "--dest", str(tmp_path / "seed"),
                  env=fleet_project.env(HF_ENDPOINT=proxy.url))
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    served = sorted(req.path.rsplit("/", 1)[-1] for req in proxy.requests if "/resolve/" in req.path)
    locked = sorted(f["path"] for f in tomllib.loads((fleet_project.dir / "models.lock").read_text())["models"]["shards"]["files"])
    assert served == locked
    v = fleet(fleet_project, keys, "verify-models", "--hosts", "h1,h2,h3", "--models", "shards", "--full")
    assert v.returncode == 0, v.stdout


def test_the_ansible_engine_gives_the_same_result(fleet_project: Project, keys: Path, hosts: list[SshHost]) -> None:
    for h in hosts:
        h.exec("rm", "-rf", "/srv/models/demo", "/srv/models/.staging/demo")
    r = fleet(fleet_project, keys, "fetch-models", "--hosts", "h1,h2,h3", "--models", "demo", "--engine", "ansible", "--serial", "2")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "PLAY RECAP" in r.stderr
    assert all(rows(r.stdout)[(h.name, "demo")].startswith("downloaded") for h in hosts), r.stdout
    same = fleet(fleet_project, keys, "verify-models", "--hosts", "h1,h2,h3", "--models", "demo", "--full")
    assert same.returncode == 0 and all(rows(same.stdout)[(h.name, "demo")].startswith("verified (full)") for h in hosts)
    again = fleet(fleet_project, keys, "fetch-models", "--hosts", "h1,h2,h3", "--models", "demo", "--engine", "ansible")
    assert all(rows(again.stdout)[(h.name, "demo")].startswith("up-to-date") for h in hosts), again.stdout


def test_the_ansible_engine_reports_an_unreachable_host(fleet_project: Project, keys: Path) -> None:
    r = fleet(fleet_project, keys, "verify-models", "--group", "fleet", "--models", "demo", "--engine", "ansible", "--connect-timeout", "3")
    assert r.returncode == 3, r.stdout + r.stderr[-2000:]
    table = rows(r.stdout)
    assert table[("down", "-")].startswith("FAILED") and "UNREACHABLE" in table[("down", "-")]
    assert table[("h1", "demo")].startswith("verified")


def test_fan_out_from_one_host(fleet_project: Project, keys: Path, hosts: list[SshHost], hub: Hub) -> None:
    for h in hosts:
        h.exec("rm", "-rf", "/srv/models/shards", "/srv/models/.staging/shards")
    proxy = Proxy(hub.endpoint).start()
    try:
        r = fleet(fleet_project, keys, "fetch-models", "--hosts", "h1,h2,h3", "--models", "shards", "--from-host", "h2", env=fleet_project.env(HF_ENDPOINT=proxy.url))
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    served = sorted(req.path.rsplit("/", 1)[-1] for req in proxy.requests if "/resolve/" in req.path)
    assert served == sorted(f["path"] for f in tomllib.loads((fleet_project.dir / "models.lock").read_text())["models"]["shards"]["files"])
    assert [line.split()[0] for line in r.stdout.splitlines()[1:4]] == ["h2", "h1", "h3"]
    v = fleet(fleet_project, keys, "verify-models", "--hosts", "h1,h2,h3", "--models", "shards", "--full")
    assert v.returncode == 0, v.stdout
