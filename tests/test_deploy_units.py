"""Deploy's pure parts as data: host variables, argv builders, env files, the history, the table; host scripts run with sh here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ops.deploy import bare, common, docker
from ops.deploy.gate import wait_ready
from ops.deploy.rollout import DeployView
from ops.deploy.steps import Deployment
from ops.deploy.target import target
from ops.errors import ConfigError, DeployLockedError, NotReadyError
from ops.images.registry import Registry
from ops.remote import commands as rc
from ops.remote.executor import HostResult, HostResults
from ops.remote.inventory import Host, parse_inventory
from ops.remote.shell import DryShell


def host_target(**hostvars: object):
    inv = parse_inventory({"all": {"hosts": {"gpu-1": {"ansible_host": "10.0.0.1", **hostvars}}}}, Path("hosts.yml"))
    return target(inv.hosts["gpu-1"], "demo")


def sh(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)


def test_host_variables_have_defaults_and_bad_values_stop_the_run() -> None:
    t = host_target()
    assert (t.port, t.model, t.process_manager, t.app_deps, t.keep_releases, t.engine) == (8000, "demo", "systemd", "wheelhouse", 3, "docker")
    assert (t.instance_ports, t.rollout, t.hold_timeout, t.drain_seconds) == ((8001, 8002), "blue-green", 300.0, 30.0)
    assert host_target(port=9000, ready_timeout=60, instance_ports=[7001, "7002"], rollout="hold").instance_ports == (7001, 7002)
    assert host_target(ready_timeout=60).hold_timeout == 60.0 and host_target(port=65535).instance_ports == (65533, 65534)
    for bad, message in [({"process_manager": "pm2"}, "process_manager 'pm2' is not one of systemd, supervise"),
                         ({"rollout": "canary"}, "rollout 'canary' is not one of blue-green, hold"),
                         ({"instance_ports": [8001]}, "a list of two port numbers"),
                         ({"instance_ports": [8001, 8001]}, "two different ports"),
                         ({"instance_ports": [8000, 8001]}, "neither of them the public port 8000"),
                         ({"instance_ports": [8001, "--x"]}, "instance_ports must be a number"),
                         ({"keep_releases": 1}, "at least 2"),
                         ({"port": "http"}, "port must be a number"),
                         ({"secrets": ["HF-TOKEN"]}, "not an environment variable name"),
                         ({"runtime": "webhook"}, "needs hook_url_env")]:
        with pytest.raises(ConfigError, match=message):
            host_target(**bad)


def test_previous_version_reads_the_history() -> None:
    assert common.previous_version("v1\nv2\n", "v2") == "v1"
    assert common.previous_version("v1\nv2\nv1\n", "v1") == "v2"  # rollback of a rollback goes forward again
    assert common.previous_version("v1\n", "v1") is None
    assert common.previous_version("", None) is None


def test_env_file_is_key_value_lines_and_refuses_line_breaks() -> None:
    assert common.env_file({"MODEL": "demo", "PORT": "8000"}) == "MODEL=demo\nPORT=8000\n"
    with pytest.raises(ConfigError, match="APP_KEY holds a line break"):
        common.env_file({"APP_KEY": "a\nb"})


def test_secrets_travel_on_stdin_never_in_argv(tmp_path: Path) -> None:
    t = host_target(runtime="docker", engine="podman")
    reg = Registry("reg.example:5000", "deployer", "s3cret-pw")
    assert docker.login_argv(t, reg) == ["podman", "login", "--username", "deployer", "--password-stdin", "reg.example:5000"]
    target_file = tmp_path / "deep" / "app.env"
    assert sh(rc.write_file_argv(str(target_file)), stdin="HF_TOKEN=hf_x\n").returncode == 0
    assert target_file.read_text() == "HF_TOKEN=hf_x\n" and oct(target_file.stat().st_mode & 0o777) == "0o600"


def test_docker_run_argv_and_gpu_flags() -> None:
    t = host_target(runtime="docker", engine="docker", gpus="0,1", models_dir="/data/models", port=9000)
    assert docker.run_argv(t, "reg/bakehouse:v2", 9001) == [
        "docker", "run", "--detach", "--name", "bakehouse-9001", "--network", "host", "--restart", "on-failure:3", "--stop-timeout", "45",
        "--env-file", "/opt/bakehouse/bakehouse-9001.env", "--volume", "/data/models:/models", "--gpus", '"device=0,1"', "--label", "bakehouse.deploy=1",
        "reg/bakehouse:v2",
    ]
    assert docker.proxy_run_argv(t, "reg/bakehouse:v2") == [
        "docker", "run", "--detach", "--name", "bakehouse-proxy", "--network", "host", "--restart", "unless-stopped", "--entrypoint", "caddy",
        "--env", "HOME=/tmp", "--env", "XDG_DATA_HOME=/tmp", "--env", "XDG_CONFIG_HOME=/tmp", "--volume", "/opt/bakehouse/proxy:/etc/bakehouse-proxy:ro",
        "--label", "bakehouse.deploy=1", "reg/bakehouse:v2", "run", "--config", "/etc/bakehouse-proxy/caddy.json",
    ]
    assert docker.gpu_flags("podman", "all") == ["--device=nvidia.com/gpu=all"]
    assert docker.gpu_flags("docker", "all") == ["--gpus", "all"]
    assert docker.gpu_flags("podman", "") == []
    assert "--volume" not in docker.run_argv(host_target(runtime="docker", models_volume=False), "x:1", 8001)
    assert docker.image_ref(t, Registry("reg.example:5000", "", ""), "v2") == "reg.example:5000/bakehouse:v2"


def test_bare_app_environment_points_at_current_and_never_fetches() -> None:
    t = host_target(prefix="/srv/bh", port=8100, app_env={"BAKEHOUSE_MAX_BATCH": "8"})
    env = bare.app_env(t, "v3")
    assert env["BAKEHOUSE_LOCK"] == "/srv/bh/releases/v3/models.lock" and env["BAKEHOUSE_AUTO_FETCH"] == "0" and env["HF_HUB_OFFLINE"] == "1"
    assert "PORT" not in env and env["BAKEHOUSE_MAX_BATCH"] == "8"
    assert common.instance_env(t, 8102) == {"HOST": "127.0.0.1", "PORT": "8102", "BAKEHOUSE_DRAIN_SECONDS": "30"}
    assert bare.app_argv(t, 8101) == ["/srv/bh/instances/8101/venv/bin/python", "-m", "app.entrypoint"]
    assert bare.fetch_argv(t, "v3") == [
        "/srv/bh/releases/v3/venv/bin/python", "-m", "ops.models", "fetch", "--lock", "/srv/bh/releases/v3/models.lock",
        "--manifest", "/srv/bh/releases/v3/models.toml", "--dest", "/srv/models", "--models", "demo", "--json", "--env-stdin",
    ]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_pass_systemd_analyze(tmp_path: Path) -> None:
    t = host_target(prefix=str(tmp_path), service="bakehouse-test")
    (tmp_path / "instances" / "8001" / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "instances" / "8001" / "venv" / "bin" / "python").symlink_to(shutil.which("python3"))
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "caddy").symlink_to(shutil.which("true"))
    instance = tmp_path / "bakehouse-test@8001.service"  # the template, as systemd loads it for one instance
    instance.write_text(bare.unit_text(t))
    front = tmp_path / "bakehouse-test-proxy.service"
    front.write_text(bare.proxy_unit_text(t))
    r = sh(["systemd-analyze", "verify", str(instance), str(front)])
    assert r.returncode == 0, r.stderr
    assert f"EnvironmentFile={tmp_path}/instances/%i.env" in instance.read_text() and "TimeoutStopSec=45" in instance.read_text()


def test_lock_is_exclusive_names_its_owner_and_only_the_owner_unlocks(tmp_path: Path) -> None:
    prefix = str(tmp_path / "opt")
    assert sh(common.lock_argv(prefix, "alice@ctl pid 1 since T")).returncode == 0
    second = sh(common.lock_argv(prefix, "bob@ctl pid 2 since T"))
    assert second.returncode == common.LOCKED and second.stdout.strip() == "alice@ctl pid 1 since T"
    sh(common.unlock_argv(prefix, "bob@ctl pid 2 since T"))
    assert (tmp_path / "opt" / "deploy.lock").exists()
    assert sh(common.break_lock_argv(prefix)).stdout.strip() == "alice@ctl pid 1 since T"
    assert sh(common.lock_argv(prefix, "bob@ctl pid 2 since T")).returncode == 0
    sh(common.unlock_argv(prefix, "bob@ctl pid 2 since T"))
    assert not (tmp_path / "opt" / "deploy.lock").exists()


def test_switch_and_prune_on_a_real_tree(tmp_path: Path) -> None:
    t = host_target(prefix=str(tmp_path))
    for version, deps in (("v1", "d1"), ("v2", "d1"), ("v3", "d2"), ("v4", "d2"), ("v5.abandoned-77", "d3")):
        (tmp_path / "releases" / version).mkdir(parents=True)
        (tmp_path / "releases" / version / "deps").write_text(deps + "\n")
    for deps in ("d1", "d2", "d3"):
        (tmp_path / "deps" / deps).mkdir(parents=True)
    assert sh(bare.switch_argv(t, "v3")).returncode == 0
    assert sh(bare.switch_argv(t, "v4")).returncode == 0
    assert os.readlink(tmp_path / "current") == "releases/v4"
    assert sh(bare.current_argv(t)).stdout.strip() == "v4"
    assert sh(bare.prune_argv(t, ["v4", "v3", "v1"])).returncode == 0
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == ["v1", "v3", "v4"]
    assert sorted(p.name for p in (tmp_path / "deps").iterdir()) == ["d1", "d2"]
    assert sh(rc.discard_argv(str(tmp_path / "releases" / "v1"))).returncode == 0
    assert not any(p.name.startswith("v1") for p in (tmp_path / "releases").iterdir())


def test_dry_shell_assumes_a_fresh_host_and_a_ready_app() -> None:
    t = host_target()
    shell = DryShell(t.host)
    wait_ready(shell, t, 8001, bare.alive_argv(t, 8001), bare.logs_argv(t, 8001))  # no NotReadyError
    assert shell.run(bare.current_argv(t), kind="query").stdout == ""
    assert shell.run(rc.write_file_argv("/x"), stdin="SECRET=1").exit_code == 0
    assert "SECRET" not in "\n".join(shell.lines) and shell.lines[-1].endswith("# stdin: (not shown)")


def row(name: str, runtime: str, deployment: Deployment | None = None, seconds: float = 0.0, **kw: object) -> HostResult[Deployment]:
    return HostResult(Host(name=name, address="10.0.0.1", runtime=runtime), deployment, seconds=seconds, **kw)  # type: ignore[arg-type]


def test_table_lists_every_host_with_old_new_result_time_and_downtime() -> None:
    why = NotReadyError("h2: the app exited before it became ready", host="h2", reason="the app exited before it became ready")
    rows = [row("h1", "bare", Deployment("v1", "v2", "deployed", held=4.2, drained=1.5), 12.3),
            row("h2", "bare", Deployment("v1", "v2", "rolled back", why, held=9.9), 30.0),
            row("h3", "bare", attempted=False)]
    text = HostResults("deploy", rows, DeployView()).render(as_json=False)
    lines = text.splitlines()
    assert lines[0].split() == ["host", "runtime", "old", "new", "result", "time", "held", "drained"]
    assert lines[1].split() == ["h1", "bare", "v1", "v2", "deployed", "12.3s", "4.2s", "1.5s"]
    assert lines[3].split() == ["h3", "bare", "-", "-", "not", "attempted", "0.0s", "-", "-"]
    assert "3 host(s): 1 failed, 1 not attempted (exit 1)" in text and "h2: the app exited before it became ready" in text
    assert Deployment("a", "b", "deployed").held is None


def test_the_example_inventory_is_valid_for_deploys() -> None:
    from ops.remote.inventory import load_inventory
    from testbed.helpers import ROOT

    inv = load_inventory(ROOT / "inventory" / "hosts.yml")
    targets = {name: target(h, "demo") for name, h in inv.hosts.items()}
    assert {t.host.runtime for t in targets.values()} == {"bare", "docker", "webhook"}
    assert targets["gpu-2"].gpus == "all" and targets["render-web"].hook_url_env == "RENDER_DEPLOY_HOOK"


def test_a_webhook_target_refuses_rollback_and_dry_run_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from ops.deploy.rollout import Plan, execute, result_of
    from ops.deploy.steps import Context
    from ops.remote.ssh import SshOptions
    from testbed.helpers import ROOT

    monkeypatch.setenv("RENDER_DEPLOY_HOOK", "http://127.0.0.1:9/never-called")
    t = host_target(runtime="webhook", hook_url_env="RENDER_DEPLOY_HOOK")
    p = Plan("rollback", (t,), Context(), SshOptions(known_hosts=ROOT / "missing"))
    r = execute(p)["gpu-1"]
    assert (result_of(r), r.exit_code) == ("failed", 2) and "cannot roll back" in str(r.error)
    assert "cannot roll back" in execute(p, dry_run=True).render(dry_run=True)


def test_the_gate_probes_ready_and_liveness_in_one_command() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert sh(common.gate_argv("python3", server.server_address[1], ["true"])).stdout.split() == ["200", "alive"]
    finally:
        server.shutdown()
    down = sh(common.gate_argv("python3", server.server_address[1], ["false"])).stdout.splitlines()
    assert down[0].startswith("0 ") and down[-1] == "dead"


def test_json_report_has_a_row_per_host_and_the_exit_code() -> None:
    import json

    rows = [row("h1", "docker", Deployment("v1", "v2", "deployed", held=1.5), 3.0), row("h2", "bare", error=DeployLockedError("locked", host="h2", owner="x"))]
    doc = json.loads(HostResults("deploy", rows, DeployView()).render(as_json=True))
    assert doc["command"] == "deploy" and doc["exit_code"] == 5
    assert [h["result"] for h in doc["hosts"]] == ["deployed", "locked"] and doc["hosts"][0]["held"] == 1.5
    assert doc["hosts"][1]["error_type"] == "DeployLockedError" and doc["hosts"][1]["error_details"] == {"host": "h2", "owner": "x"}


def start_script(t, port: int, version: str, gate_answer: str, logs: str | None = None) -> list:
    """What starting `version` on the instance at `port` runs (supervised bare host), up to its /ready gate."""
    from testbed.scripted import ok

    steps = [(bare.point_instance_argv(t, port, version), ok()), (rc.write_file_argv(bare.instance_env_path(t, port)), ok()),
             *((argv, ok()) for argv in bare.start_argvs(t, port)), (common.gate_argv(t.host.python, port, bare.alive_argv(t, port)), ok(gate_answer))]
    return steps + ([(bare.logs_argv(t, port), ok(logs))] if logs is not None else [])


def rollback_start(t) -> list:
    """rollback_bare's first steps on a host whose instance on 8001 serves v2, with v1 before it in the history."""
    from testbed.scripted import ok

    return [
        (rc.read_argv(bare.active_path(t)), ok("8001\n")),
        (bare.instance_version_argv(t, 8001), ok("v2\n")),
        (common.history_argv(t.prefix), ok("v1\nv2\n")),
        (rc.exists_argv(f"{t.prefix}/releases/v1/.complete"), ok()),
        (rc.exists_argv(f"{t.prefix}/releases/v1/app.env"), ok()),  # v1 has its own configuration: it is not rewritten
    ]


def test_blue_green_a_rollback_whose_target_never_starts_leaves_the_current_release_serving() -> None:
    from ops.deploy.steps import Context, rollback_bare
    from testbed.scripted import ScriptedShell, ok

    t = host_target(process_manager="supervise", prefix="/opt/bh")
    sh = ScriptedShell(t.host, [*rollback_start(t), *start_script(t, 8002, "v1", "0 connection refused\ndead", "boom: v1 cannot start"),
                                (bare.stop_argv(t, 8002), ok())])
    d = rollback_bare(sh, t, Context())
    sh.done()  # v2's instance on 8001 was never stopped
    assert (d.old, d.new, d.result, d.exit_code, d.held) == ("v2", "v1", "restored", 1, None)
    assert "the app exited before it became ready. Last log lines: boom: v1 cannot start" in str(d.error)


def test_hold_a_rollback_whose_target_never_starts_brings_the_current_release_back() -> None:
    from ops.deploy.steps import Context, rollback_bare
    from testbed.scripted import ScriptedShell, ok

    t = host_target(process_manager="supervise", prefix="/opt/bh", rollout="hold")
    sh = ScriptedShell(t.host, [*rollback_start(t), (bare.stop_argv(t, 8001), ok()),
                                *start_script(t, 8002, "v1", "0 connection refused\ndead", "boom: v1 cannot start"), (bare.stop_argv(t, 8002), ok()),
                                *start_script(t, 8001, "v2", "200\nalive")])
    d = rollback_bare(sh, t, Context())
    sh.done()
    assert (d.old, d.new, d.result, d.exit_code) == ("v2", "v1", "restored", 1) and d.held is not None and d.drained is not None
    assert "starting v2 again" in " ".join(sh.said)


def test_hold_a_rollback_where_neither_release_starts_says_so() -> None:
    from ops.deploy.steps import Context, rollback_bare
    from testbed.scripted import ScriptedShell, ok

    t = host_target(process_manager="supervise", prefix="/opt/bh", rollout="hold")
    sh = ScriptedShell(t.host, [*rollback_start(t), (bare.stop_argv(t, 8001), ok()),
                                *start_script(t, 8002, "v1", "0 connection refused\ndead", "boom: v1 cannot start"), (bare.stop_argv(t, 8002), ok()),
                                *start_script(t, 8001, "v2", "0 connection refused\ndead", "boom: v2 is gone too")])
    d = rollback_bare(sh, t, Context())
    sh.done()
    assert (d.result, d.exit_code) == ("failed", 1)
    assert "v2 did not come back either: the app exited before it became ready. Last log lines: boom: v2 is gone too" in str(d.error)


def test_the_scripted_shell_fails_on_an_unexpected_command() -> None:
    from ops.deploy.steps import Context, rollback_bare
    from testbed.scripted import ScriptedShell, ok

    t = host_target(process_manager="supervise")
    sh = ScriptedShell(t.host, [(rc.read_argv(bare.active_path(t)), ok("8001\n")), (["true"], ok())])
    with pytest.raises(AssertionError, match="expected \\['true'\\]"):
        rollback_bare(sh, t, Context())


def test_the_proxy_holds_checks_ready_and_streams_unbuffered() -> None:
    import json

    from ops.deploy import proxy

    config = json.loads(proxy.config_text(host_target(port=9000, instance_ports=[9101, 9102], hold_timeout=120)))
    server = config["apps"]["http"]["servers"]["bakehouse"]
    [handler] = server["routes"][0]["handle"]
    assert server["listen"] == [":9000"] and config["admin"]["disabled"] is True
    assert [u["dial"] for u in handler["upstreams"]] == ["127.0.0.1:9101", "127.0.0.1:9102"]
    assert handler["flush_interval"] == -1 and handler["load_balancing"]["try_duration"] == "120s"
    assert handler["health_checks"]["active"]["uri"] == "/ready"
    headers = server["errors"]["routes"][0]["handle"][0]["response"]["set"]
    assert headers["Retry-After"] == ["5"]


def test_gpu_hosts_are_checked_before_anything_stops() -> None:
    from ops.deploy.steps import check_gpus
    from ops.errors import StepFailedError
    from testbed.scripted import ScriptedShell, fails

    t = host_target(runtime="docker", engine="docker", gpus="all")
    assert docker.gpu_check_argv(t) == ["sh", "-c", 'command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && "$1" info --format "{{json .Runtimes}}" '
                                         "2>/dev/null | grep -q nvidia", "sh", "docker"]
    assert "nvidia-ctk cdi list" in docker.gpu_check_argv(host_target(runtime="docker", engine="podman", gpus="0"))[2]
    assert docker.gpu_check_argv(host_target(runtime="docker", gpus="")) is None
    sh = ScriptedShell(t.host, [(docker.gpu_check_argv(t), fails())])
    with pytest.raises(StepFailedError, match="nvidia-smi must answer, and docker needs the NVIDIA Container Toolkit"):
        check_gpus(sh, t)
    sh.done()
