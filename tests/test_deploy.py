"""`invoke deploy` / `invoke rollback` on real hosts: bare hosts as sshd containers, this machine as a podman host, a webhook."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from ops.net import free_port
from testbed.helpers import HF_DEMO, ROOT, TOKEN, Hub, Project, manifest
from testbed.load import Load, LoadReport
from testbed.proxy import Proxy
from testbed.sshhosts import SshHost, start_host

pytestmark = pytest.mark.hosts

INVOKE = [sys.executable, "-m", "invoke"]
SECRET = "app-secret-9f8e7d6c5b4a"
PREFIX = "/opt/bakehouse"
INSTANCE_PORTS: dict[str, tuple[int, int]] = {}


@pytest.fixture(scope="module")
def hosts(keys: Path) -> Iterator[dict[str, SshHost]]:
    started = {name: start_host(name, keys) for name in ("h1", "h2", "h3")}
    yield started
    for h in started.values():
        h.stop()


@pytest.fixture(scope="module")
def ports(hosts: dict[str, SshHost]) -> dict[str, int]:
    """The hosts share this machine's network, so each front proxy listens on its own port."""
    return {name: free_port() for name in hosts}


@pytest.fixture(scope="module")
def instance_ports(hosts: dict[str, SshHost]) -> dict[str, tuple[int, int]]:
    """And each host's two app instances on theirs."""
    return {name: (free_port(), free_port()) for name in hosts}


def write_inventory(path: Path, keys: Path, hosts: dict[str, SshHost], ports: dict[str, int], extra: dict[str, str] | None = None) -> Path:
    lines = ["all:", "  vars:", f"    ansible_ssh_private_key_file: {keys / 'id'}", "    runtime: bare", "    process_manager: supervise",
             "    ready_timeout: 180", "    secrets: [APP_SECRET]", "  children:", "    web:", "      hosts:"]
    for name, h in hosts.items():
        a, b = INSTANCE_PORTS[name]
        lines += [f"        {name}:", "          ansible_host: 127.0.0.1", f"          ansible_port: {h.port}", f"          port: {ports[name]}",
                  f"          instance_ports: [{a}, {b}]"]
        lines += [f"          {line}" for line in (extra or {}).get(name, "").splitlines()]
    lines += ["        down:", "          ansible_host: 127.0.0.1", f"          ansible_port: {free_port()}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def site(hub: Hub, tmp_path_factory: pytest.TempPathFactory, keys: Path, hosts: dict[str, SshHost], ports: dict[str, int],
         instance_ports: dict[str, tuple[int, int]]) -> Project:
    INSTANCE_PORTS.update(instance_ports)
    p = Project(tmp_path_factory.mktemp("deploy") / "project", hub.endpoint)
    p.dir.mkdir()
    p.write_manifest('default = ["demo"]\n\n' + manifest(demo=HF_DEMO))
    assert p.run("lock").returncode == 0
    write_inventory(p.dir / "hosts.yml", keys, hosts, ports)
    return p


def deploy(site: Project, keys: Path, command: str, *flags: str, search_root: Path = ROOT, inventory: str = "hosts.yml", **env: str) -> subprocess.CompletedProcess[str]:
    argv = [*INVOKE, "--search-root", str(search_root), command, "--inventory", inventory, "--known-hosts", str(keys / "known_hosts"), *flags]
    return subprocess.run(argv, cwd=site.dir, env=site.env(HF_TOKEN=TOKEN, APP_SECRET=SECRET, **env), capture_output=True, text=True, timeout=900, check=False)


def table(out: str) -> dict[str, list[str]]:
    """Rows by host: [runtime, old, new, result…, time]."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("host "))
    end = next(i for i, line in enumerate(lines) if " host(s): " in line)
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1 : end]}


def ready(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code
    except httpx.TransportError:
        return 0


def current(host: SshHost) -> str:
    return host.exec("sh", "-c", f"basename $(readlink {PREFIX}/current) 2>/dev/null || true").stdout.strip()


def fresh(host: SshHost) -> None:
    """Nothing deployed (no app, proxy, release, history or lock); the shared dependency venvs stay, as on a host that had them once."""
    stop = (f"for d in {PREFIX}/run/*/; do [ -x {PREFIX}/current/venv/bin/python ] && {PREFIX}/current/venv/bin/python -m ops.deploy.supervise stop "
            f"--run-dir $d --stop-timeout 1; done")
    host.exec("sh", "-c", f"{stop}; pkill -f '[a]pp.entrypoint'; pkill -f '[c]addy run'; rm -rf {PREFIX}/releases {PREFIX}/current {PREFIX}/history "
              f"{PREFIX}/deploy.lock {PREFIX}/run {PREFIX}/instances {PREFIX}/active {PREFIX}/proxy", check=False)


def serving_versions(site: Project, keys: Path, host: SshHost, *versions: str) -> None:
    """The host serves the last of `versions`, deployed in order from nothing: each test sets up its own history."""
    fresh(host)
    for version in versions:
        r = deploy(site, keys, "deploy", "--hosts", host.name, "--tag", version)
        assert r.returncode == 0, r.stdout + r.stderr


def state(host: SshHost) -> str:
    """Everything under the host's prefix, to show a command left it alone."""
    return host.exec("sh", "-c", f"find {PREFIX} -exec ls -ld --time-style=full-iso {{}} + 2>/dev/null || echo absent", check=False).stdout


def active_port(host: SshHost) -> int:
    return int(host.exec("cat", f"{PREFIX}/active").stdout)


def app_pid(host: SshHost) -> int:
    return json.loads(host.exec("cat", f"{PREFIX}/run/{active_port(host)}/state.json").stdout)["child"]


def alive(host: SshHost, pid: int) -> bool:
    return host.exec("kill", "-0", str(pid), check=False).returncode == 0


def test_dry_run_prints_every_command_and_touches_no_host(site: Project, keys: Path, hosts: dict[str, SshHost]) -> None:
    before = state(hosts["h1"])
    r = deploy(site, keys, "deploy", "--hosts", "h1,down", "--tag", "v1", "--dry-run", HF_ENDPOINT="https://mirror-user:mirror-pw@hub.example/hf")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "# h1 (bare, root@127.0.0.1" in r.stdout and "# down (bare" in r.stdout
    for expected in ("-m venv /opt/bakehouse/releases/v1/venv", "-m ops.models fetch --lock /opt/bakehouse/releases/v1/models.lock",
                     "ln -sfn", "ops.deploy.supervise restart", "/ready", "deploy.lock"):
        assert expected in r.stdout, expected
    assert SECRET not in r.stdout + r.stderr and TOKEN not in r.stdout + r.stderr and "mirror-pw" not in r.stdout + r.stderr
    assert "--env-stdin    # stdin: (not shown)" in r.stdout
    assert state(hosts["h1"]) == before


def test_an_unreachable_host_fails_with_the_reason_and_stops_the_rollout(site: Project, keys: Path, hosts: dict[str, SshHost]) -> None:
    before = state(hosts["h1"])
    r = deploy(site, keys, "deploy", "--hosts", "down,h1", "--tag", "v1")
    assert r.returncode == 3, r.stdout + r.stderr
    rows = table(r.stdout)
    assert rows["down"][3] == "failed" and "cannot reach 127.0.0.1" in r.stdout
    assert rows["h1"][3:5] == ["not", "attempted"]
    assert state(hosts["h1"]) == before


def snapshot_ps(host: SshHost, stop: threading.Event, seen: list[str]) -> None:
    while not stop.is_set():
        seen.append(host.exec("ps", "-eo", "args", check=False).stdout)
        time.sleep(0.2)


def test_deploy_serves_the_new_release_and_retires_the_old(site: Project, keys: Path, hosts: dict[str, SshHost], ports: dict[str, int]) -> None:
    h1 = hosts["h1"]
    fresh(h1)
    first = deploy(site, keys, "deploy", "--hosts", "h1", "--tag", "v1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert table(first.stdout)["h1"][:4] == ["bare", "-", "v1", "deployed"]
    assert ready(ports["h1"]) == 200 and current(h1) == "v1"
    old_pid = app_pid(h1)

    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=snapshot_ps, args=(h1, stop, seen))
    watcher.start()
    try:
        second = deploy(site, keys, "deploy", "--hosts", "h1", "--tag", "v2")
    finally:
        stop.set()
        watcher.join()
    assert second.returncode == 0, second.stdout + second.stderr
    assert table(second.stdout)["h1"][:4] == ["bare", "v1", "v2", "deployed"]
    assert current(h1) == "v2" and ready(ports["h1"]) == 200
    assert not alive(h1, old_pid), "the old release's app still runs"
    completion = httpx.post(f"http://127.0.0.1:{ports['h1']}/v1/completions", json={"model": "demo", "prompt": "hello", "max_tokens": 4}, timeout=60)
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] is not None
    # Through the front proxy a stream arrives token by token, not buffered into one piece at its end.
    body = {"model": "demo", "prompt": "hello", "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{ports['h1']}/v1/completions", json=body, timeout=60) as r:
        pieces = [(time.monotonic(), chunk) for chunk in r.iter_raw()]
    assert b"".join(c for _, c in pieces).rstrip().endswith(b"data: [DONE]") and len(pieces) >= 10, len(pieces)
    assert pieces[-1][0] - pieces[0][0] > 0.05

    # Secrets: in the 0600 env file the app reads, nowhere else.
    assert h1.exec("stat", "-c", "%a", f"{PREFIX}/current/app.env").stdout.strip() == "600"
    assert f"APP_SECRET={SECRET}" in h1.exec("cat", f"{PREFIX}/current/app.env").stdout
    history = h1.exec("cat", f"{PREFIX}/history").stdout
    assert re.search(r"^v2 config=[0-9a-f]{12}$", history, re.M) and SECRET not in history
    assert len(seen) > 5 and not any(SECRET in s or TOKEN in s for s in seen)
    for text in (first.stdout + first.stderr, second.stdout + second.stderr, h1.exec("cat", f"{PREFIX}/run/{active_port(h1)}/app.log").stdout):
        assert SECRET not in text and TOKEN not in text

    again = deploy(site, keys, "deploy", "--hosts", "h1", "--tag", "v2")
    assert again.returncode == 0 and table(again.stdout)["h1"][3] == "unchanged"


def test_release_that_never_becomes_ready_is_rolled_back(site: Project, keys: Path, hosts: dict[str, SshHost], ports: dict[str, int], broken_checkout: Path) -> None:
    serving_versions(site, keys, hosts["h1"], "v2")
    r = deploy(site, keys, "deploy", "--hosts", "h1", "--tag", "broken", search_root=broken_checkout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert table(r.stdout)["h1"][:5] == ["bare", "v2", "broken", "rolled", "back"]
    assert "exited before it became ready" in r.stdout and "boom" in r.stdout
    assert current(hosts["h1"]) == "v2" and ready(ports["h1"]) == 200


def test_rollback_returns_to_the_previous_release(site: Project, keys: Path, hosts: dict[str, SshHost], ports: dict[str, int]) -> None:
    serving_versions(site, keys, hosts["h1"], "v1", "v2")
    r = deploy(site, keys, "rollback", "--hosts", "h1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert table(r.stdout)["h1"][:4] == ["bare", "v2", "v1", "reverted"]
    assert current(hosts["h1"]) == "v1" and ready(ports["h1"]) == 200


def test_rolling_deploy_stops_at_the_batch_that_failed(site: Project, keys: Path, hosts: dict[str, SshHost], ports: dict[str, int]) -> None:
    # h2's settings make the app exit at start; h3 must keep what it has (nothing).
    serving_versions(site, keys, hosts["h1"], "v1")
    fresh(hosts["h2"])
    hosts["h3"].exec("rm", "-rf", PREFIX)
    write_inventory(site.dir / "rolling.yml", keys, hosts, ports, {"h2": "app_env:\n  BAKEHOUSE_MAX_BATCH: many"})
    r = deploy(site, keys, "deploy", "--hosts", "h1,h2,h3", "--tag", "v3", "--serial", "1", inventory="rolling.yml")
    print(r.stdout)  # the README shows this table
    assert r.returncode == 1, r.stdout + r.stderr
    rows = table(r.stdout)
    assert rows["h1"][:4] == ["bare", "v1", "v3", "deployed"]
    assert rows["h2"][3] == "failed" and "BAKEHOUSE_MAX_BATCH" in r.stdout
    assert rows["h3"][:5] == ["bare", "-", "-", "not", "attempted"]
    assert hosts["h3"].exec("test", "-e", PREFIX, check=False).returncode != 0
    assert ready(ports["h2"]) == 0 and ready(ports["h1"]) == 200


def test_deploy_with_peer_fan_out_takes_each_file_from_the_origin_once(site: Project, keys: Path, hosts: dict[str, SshHost], ports: dict[str, int],
                                                                       hub: Hub) -> None:
    for name in ("h2", "h3"):
        fresh(hosts[name])
        hosts[name].exec("rm", "-rf", "/srv/models/demo", "/srv/models/.staging/demo")
    plan = deploy(site, keys, "deploy", "--hosts", "h2,h3", "--tag", "v1", "--fan-out", "peers", "--dry-run")
    assert plan.returncode == 0 and "peer-serve" in plan.stderr and "takes each file from h2 as soon as it has verified it" in plan.stderr, plan.stdout + plan.stderr
    proxy = Proxy(hub.endpoint).start()
    try:
        r = deploy(site, keys, "deploy", "--hosts", "h2,h3", "--tag", "v1", "--serial", "2", "--fan-out", "peers", HF_ENDPOINT=proxy.url)
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert [table(r.stdout)[name][3] for name in ("h2", "h3")] == ["deployed", "deployed"], r.stdout
    assert "peer fan-out of demo before the rollout" in r.stderr
    served = sorted(req.path.rsplit("/", 1)[-1] for req in proxy.requests if "/resolve/" in req.path and req.method == "GET")
    assert served == sorted(f["path"] for f in tomllib.loads((site.dir / "models.lock").read_text())["models"]["demo"]["files"])
    assert ready(ports["h2"]) == 200 and ready(ports["h3"]) == 200


def assert_no_request_failed(report: LoadReport, out: str) -> None:
    assert not report.problems(), f"{report.problems()}\n{report.summary()}\n{out}"


def test_blue_green_hold_failed_deploy_and_rollback_fail_no_request_under_load(site: Project, keys: Path, hosts: dict[str, SshHost],
                                                                                ports: dict[str, int], broken_checkout: Path) -> None:
    h2, port = hosts["h2"], ports["h2"]
    write_inventory(site.dir / "hold.yml", keys, hosts, ports, {"h2": "rollout: hold"})
    fresh(h2)
    first = deploy(site, keys, "deploy", "--hosts", "h2", "--tag", "v1")
    assert first.returncode == 0, first.stdout + first.stderr
    steps = [("deploy", "v2", "hosts.yml", ROOT, ["bare", "v1", "v2", "deployed"]), ("deploy", "v3", "hold.yml", ROOT, ["bare", "v2", "v3", "deployed"]),
             ("deploy", "broken", "hold.yml", broken_checkout, ["bare", "v3", "broken", "rolled"]), ("rollback", "", "hold.yml", ROOT, ["bare", "v3", "v2", "reverted"])]
    for command, tag, inventory, root, row in steps:
        flags = ["--hosts", "h2", *(["--tag", tag] if tag else [])]
        r, load = Load(f"http://127.0.0.1:{port}", clients=4).during(
            lambda: deploy(site, keys, command, *flags, search_root=root, inventory=inventory))  # noqa: B023 (called at once)
        assert table(r.stdout)["h2"][:4] == row, r.stdout + r.stderr
        assert_no_request_failed(load, r.stdout)
        held = table(r.stdout)["h2"][-2]
        assert (held == "-") if inventory == "hosts.yml" else held.endswith("s"), r.stdout
    assert current(h2) == "v2"


def wait_for_lock(host: SshHost, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while host.exec("test", "-e", f"{PREFIX}/deploy.lock/owner", check=False).returncode != 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the deploy never took its lock"
        time.sleep(0.1)


def test_concurrent_deploys_are_refused_stale_locks_are_named_and_old_releases_pruned(site: Project, keys: Path, hosts: dict[str, SshHost]) -> None:
    h1 = hosts["h1"]
    serving_versions(site, keys, h1, "v2", "v3")
    argv = [*INVOKE, "--search-root", str(ROOT), "deploy", "--inventory", "hosts.yml", "--known-hosts", str(keys / "known_hosts"), "--hosts", "h1"]
    env = site.env(HF_TOKEN=TOKEN, APP_SECRET=SECRET)
    first = subprocess.Popen([*argv, "--tag", "v4"], cwd=site.dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lock(h1, first)
    second = deploy(site, keys, "deploy", "--hosts", "h1", "--tag", "v5")
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out + err
    assert second.returncode == 5, second.stdout + second.stderr
    assert table(second.stdout)["h1"][3] == "locked"
    assert f"pid {first.pid} since" in second.stdout and "--break-lock" in second.stdout
    assert current(h1) == "v4"

    crashed = subprocess.Popen([*argv, "--tag", "v5"], cwd=site.dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_lock(h1, crashed)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    stale = deploy(site, keys, "deploy", "--hosts", "h1", "--tag", "v5")
    assert stale.returncode == 5 and f"pid {crashed.pid} since" in stale.stdout
    broken = deploy(site, keys, "deploy", "--hosts", "h1", "--tag", "v5", "--break-lock")
    assert broken.returncode == 0, broken.stdout + broken.stderr
    assert table(broken.stdout)["h1"][3] == "deployed" and current(h1) == "v5"
    assert h1.exec("test", "-e", f"{PREFIX}/deploy.lock", check=False).returncode != 0
    kept = h1.exec("ls", f"{PREFIX}/releases").stdout.split()  # v2..v5 deployed: keep_releases (3) stay
    assert sorted(kept) == ["v3", "v4", "v5"], kept
    assert len(h1.exec("ls", f"{PREFIX}/deps").stdout.split()) == 1


class Hook(BaseHTTPRequestHandler):
    calls: ClassVar[list[str]] = []
    status = 200

    def do_POST(self) -> None:
        Hook.calls.append(self.path)
        body = json.dumps({"deploy": {"id": "dep-123"}}).encode()
        self.send_response(Hook.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_webhook_target_posts_the_hook_and_reports_the_answer(site: Project, keys: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (site.dir / "hook.yml").write_text("all:\n  hosts:\n    render:\n      runtime: webhook\n      hook_url_env: RENDER_DEPLOY_HOOK\n")
        url = f"http://127.0.0.1:{server.server_address[1]}/deploy/srv-abc?key=hook-secret-key"
        env = site.env(RENDER_DEPLOY_HOOK=url)
        argv = [*INVOKE, "--search-root", str(ROOT), "deploy", "--inventory", "hook.yml", "--hosts", "render"]
        ok = subprocess.run(argv, cwd=site.dir, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert table(ok.stdout)["render"][:4] == ["webhook", "-", "dep-123", "triggered"]
        assert Hook.calls == ["/deploy/srv-abc?key=hook-secret-key"]
        Hook.status = 500
        bad = subprocess.run(argv, cwd=site.dir, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert bad.returncode == 3 and "answered 500" in bad.stdout
        for r in (ok, bad):
            assert "hook-secret-key" not in r.stdout + r.stderr
        missing = subprocess.run(argv, cwd=site.dir, env=site.env(), capture_output=True, text=True, timeout=120, check=False)
        assert missing.returncode == 2 and "RENDER_DEPLOY_HOOK not set" in missing.stderr
    finally:
        server.shutdown()
