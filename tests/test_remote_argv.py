"""What runs on hosts, as data: argv builders for the SSH and Ansible engines."""

from __future__ import annotations

import io
import os
from pathlib import Path

import paramiko
import pytest

from ops.errors import ConfigError, NoReportError
from ops.remote import commands as rc
from ops.remote.ansible import ansible_env, host_plan, playbook_argv
from ops.remote.executor import HostResult, HostResults, Rollout
from ops.remote.hostmodels import HostModels, ModelsView, parse_report
from ops.remote.inventory import Host
from ops.remote.job import FleetJob
from ops.remote.ssh import Output, SshOptions, host_key_name, known_hosts
from ops.remote.wheelhouse import Wheelhouse
from ops.settings import env_lines, read_env_lines

HOST = Host(name="gpu-1", address="10.0.0.1", models_dir="/data/models", prefix="/opt/bh", python="/usr/bin/python3")
WH = Wheelhouse(Path("/build/wheelhouse"), ("bakehouse-0.1.0-py3-none-any.whl", "tqdm-4.70.1-py3-none-any.whl"), "abc123")


def test_fetch_argv_carries_no_setting_and_the_token_goes_on_stdin(monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://user:pw@hub:8090")
    monkeypatch.setenv("HOME", "/root")
    argv = rc.model_argv(HOST, "fetch", models=["demo"])
    assert argv == ["/opt/bh/venv/bin/python", "-m", "ops.models", "fetch", "--lock", "/opt/bh/models.lock", "--dest", "/data/models", "--json", "--env-stdin", "--models", "demo"]
    stdin = env_lines(rc.model_env("fetch", "hf_secret"))
    assert stdin == "HF_ENDPOINT=https://user:pw@hub:8090\nBAKEHOUSE_PROGRESS_SECONDS=2\nHF_TOKEN=hf_secret\n\n"
    assert read_env_lines(io.StringIO(stdin + "ignored after the blank line\n")) == {"HF_ENDPOINT": "https://user:pw@hub:8090", "BAKEHOUSE_PROGRESS_SECONDS": "2",
                                                                                   "HF_TOKEN": "hf_secret"}
    assert "HF_TOKEN" not in env_lines(rc.model_env("verify", "hf_secret"))
    with pytest.raises(ConfigError, match="LD_PRELOAD"):
        read_env_lines(io.StringIO("LD_PRELOAD=/tmp/x.so\n\n"))


def test_verify_argv() -> None:
    argv = rc.model_argv(HOST, "verify", models=[], full=True)
    assert argv[-3:] == ["--json", "--env-stdin", "--full"]


def test_bootstrap_argv_installs_offline_exactly_the_uploaded_wheels() -> None:
    boot = rc.bootstrap(HOST, WH.wheels, WH.digest)
    assert boot.venv == ["/usr/bin/python3", "-m", "venv", "/opt/bh/venv"]
    assert boot.install == ["/opt/bh/venv/bin/python", "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--force-reinstall",
                            "/opt/bh/wheelhouse/bakehouse-0.1.0-py3-none-any.whl", "/opt/bh/wheelhouse/tqdm-4.70.1-py3-none-any.whl"]
    assert boot.mkdir == ["mkdir", "-p", "/opt/bh/wheelhouse", "/data/models"]
    assert boot.check == ["sh", "-c", '[ "$(cat "$1" 2>/dev/null)" = "$2" ]', "sh", "/opt/bh/venv/.bakehouse-wheelhouse", "abc123"]
    assert boot.mark == ["sh", "-c", 'printf "%s" "$2" > "$1"', "sh", "/opt/bh/venv/.bakehouse-wheelhouse", "abc123"]


def test_the_ansible_plan_is_the_ssh_engines_argv() -> None:
    job = FleetJob(command="fetch", lock=Path("models.lock"), models=("demo",), rollout=Rollout(parallel=4), ssh=SshOptions(known_hosts=Path("/kh"), host_key_policy="accept-new"))
    plan = host_plan(HOST, job, WH)
    assert plan["command"] == rc.model_argv(HOST, "fetch", models=("demo",))
    boot = rc.bootstrap(HOST, WH.wheels, WH.digest)
    assert (plan["check_marker"], plan["install"], plan["touch_marker"]) == (boot.check, boot.install, boot.mark)
    argv = playbook_argv(Path("hosts.yml"), Path("/tmp/vars.json"), forks=4)
    assert argv[0] == "ansible-playbook" and argv[-2:] == ["--forks", "4"] and "@/tmp/vars.json" in argv
    assert "StrictHostKeyChecking=accept-new" in ansible_env(job)["ANSIBLE_SSH_ARGS"] and "UserKnownHostsFile=/kh" in ansible_env(job)["ANSIBLE_SSH_ARGS"]


def test_host_report_and_table() -> None:
    report = parse_report("gpu-1", '{"exit_code": 0, "models": [{"model": "demo", "status": "downloaded", "bytes": 2000000, "seconds": 2.0, "exit_code": 0, "ok": true}]}', "")
    with pytest.raises(NoReportError) as caught:
        parse_report("gpu-2", "not json", "Traceback\nOSError: disk on fire")
    ok = HostResult(HOST, HostModels("installed", report))
    bad = HostResult(Host(name="gpu-2", address="10.0.0.2"), error=caught.value)
    assert ok.ok and report.outcomes[0].bytes == 2000000
    assert not bad.ok and str(bad.error) == "OSError: disk on fire"
    text = HostResults("fetch", [ok, bad], ModelsView()).table()
    assert "gpu-1  demo   downloaded  2.0 MB  2.0s  1.0 MB/s" in text
    assert text.splitlines()[-1] == "gpu-2: OSError: disk on fire" and "2 host(s), 1 failed (exit 1)" in text
    forged = HostResult(Host(name="gpu-3", address="10.0.0.3"), error=NoReportError("timed out\nConnection to 10.0.0.3 timed out\ngpu-1 demo: lies"))
    lines = HostResults("fetch", [ok, forged], ModelsView()).table().splitlines()
    assert lines[-1] == "gpu-3: timed out Connection to 10.0.0.3 timed out gpu-1 demo: lies" and not lines[-2].startswith("gpu-1 demo:")


def test_an_ansible_failure_row_carries_ansibles_reason(tmp_path: Path) -> None:
    from ops.remote.ansible import _result

    censored = "\n".join([
        "TASK [Run the model command (the HF token goes on stdin)] ***",
        "[ERROR]: Task failed: Timed out after 3 second(s).",
        "Origin: /x/models-playbook.yml:48:7",
        '48     - name: Run the model command (the HF token goes on stdin)',
        'fatal: [gpu-1]: FAILED! => {"censored": "the output has been hidden", "changed": false}',
    ])
    r = _result(HOST, tmp_path / "none.json", censored)
    assert (r.exit_code, str(r.error)) == (3, "Task failed: Timed out after 3 second(s).")
    down = _result(HOST, tmp_path / "none.json", 'fatal: [gpu-1]: UNREACHABLE! => {"msg": "Failed to connect to the host via ssh", "unreachable": true}')
    assert (down.exit_code, str(down.error)) == (3, "UNREACHABLE: Failed to connect to the host via ssh")


def test_known_hosts_is_parsed_once_and_again_when_it_changes(tmp_path: Path) -> None:
    """Parsing it per host made the controller's CPU per host grow with the fleet (paramiko's parse is quadratic in the lines)."""
    key = paramiko.ECDSAKey.generate()
    path = tmp_path / "known_hosts"
    path.write_text(f"[10.0.0.1]:2222 {key.get_name()} {key.get_base64()}\n")
    first = known_hosts(path)
    assert known_hosts(path) is first and set(first.lookup(host_key_name(Host(name="a", address="10.0.0.1", port=2222)))) == {key.get_name()}
    assert first.lookup(host_key_name(Host(name="b", address="10.0.0.1"))) == {}  # port 22 is another entry
    path.write_text(path.read_text() + f"10.0.0.2 {key.get_name()} {key.get_base64()}\n")
    os.utime(path, ns=(1, 1))  # a change the clock's resolution might hide
    assert host_key_name(Host(name="c", address="10.0.0.2")) == "10.0.0.2" and known_hosts(path).lookup("10.0.0.2") != {}
    assert len(known_hosts(tmp_path / "missing")) == 0


def test_known_hosts_reads_what_openssh_writes(tmp_path: Path) -> None:
    """Several names on a line, hashed names (HashKnownHosts yes), comments and lines no one can read."""
    key, other = paramiko.ECDSAKey.generate(), paramiko.RSAKey.generate(1024)
    path = tmp_path / "known_hosts"
    path.write_text("# a comment\n\nnot a key line\n"
                    f"gpu-1,10.0.0.5 {key.get_name()} {key.get_base64()}\n"
                    f"{paramiko.HostKeys.hash_host('[10.0.0.9]:2222')} {other.get_name()} {other.get_base64()}\n")
    hosts = known_hosts(path)
    assert hosts.lookup("gpu-1") == hosts.lookup("10.0.0.5") == {key.get_name(): key}
    assert hosts.lookup("[10.0.0.9]:2222") == {other.get_name(): other} and hosts.lookup("10.0.0.9") == {}


def test_remote_output_is_decoded_across_packets_and_handed_on_by_line() -> None:
    """A character split between two SSH packets is one character; stderr lines go out as they complete, the last even without a newline."""
    seen: list[str] = []
    err = Output(seen.append)
    data = "fetching caf\u00e9\n50%\ndone".encode()
    cut = data.index(b"\xa9")  # between the two bytes of the accented letter
    err.feed(data[:cut])
    assert seen == []
    err.feed(data[cut:])
    assert seen == ["fetching caf\u00e9", "50%"]
    err.feed(b"", final=True)
    assert seen == ["fetching caf\u00e9", "50%", "done"] and err.text == "fetching caf\u00e9\n50%\ndone"
