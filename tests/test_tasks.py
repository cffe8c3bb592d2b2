"""The Invoke tasks users type, run as processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.helpers import ROOT, Hub, Project

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


TASKS = ("lock-models", "fetch-models", "verify-models", "build", "push", "deploy", "rollback", "serve", "demo", "test")


def test_list_shows_every_task_with_help() -> None:
    out = subprocess.run([*INVOKE, "--list"], capture_output=True, text=True, check=True).stdout
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert sorted(listed) == sorted(TASKS), out
    for name in TASKS:
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert len(line.split()) > 2, f"{name} has no help line"
        flags = subprocess.run([*INVOKE, name, "--help"], capture_output=True, text=True, check=True).stdout
        options = [re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in flags.splitlines() if re.match(r"^  -", line)]
        undocumented = [parts[0] for parts in options if len(parts) < 2]
        assert not undocumented, f"{name}: flags without help: {undocumented}"


@pytest.mark.slow
def test_demo_runs_offline_end_to_end() -> None:
    r = subprocess.run([*INVOKE, "demo"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "committed models.lock matches a fresh lock of the hub" in r.stdout
    assert "up-to-date" in r.stdout and "verified (quick)" in r.stdout
    assert "The weights are locked, fetched, verified and then served." in r.stdout


def test_fetch_models_task_exit_codes_match_the_cli(project: Project, hub: Hub, tmp_path: Path) -> None:
    env = project.env()
    lock = [*INVOKE, "lock-models", "--models", "demo", "--manifest", str(project.dir / "models.toml"), "--lock", str(project.dir / "models.lock")]
    assert subprocess.run(lock, env=env, capture_output=True).returncode == 0
    fetch = [*INVOKE, "fetch-models", "--models", "demo", "--manifest", str(project.dir / "models.toml"), "--lock", str(project.dir / "models.lock"),
             "--dest", str(tmp_path / "store")]
    r = subprocess.run([*fetch, "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and '"status": "downloaded"' in r.stdout
    r = subprocess.run(fetch, env=project.env(HF_ENDPOINT="http://127.0.0.1:9"), capture_output=True, text=True)
    assert r.returncode == 0 and "up-to-date" in r.stdout
    r = subprocess.run([*INVOKE, "verify-models", "--models", "nope", "--lock", str(project.dir / "models.lock")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no entry for 'nope'" in r.stderr


def test_fleet_dry_runs_print_every_host_command_and_connect_to_none(project: Project, tmp_path: Path) -> None:
    env = project.env(HF_TOKEN="hf_DryRunSecret0123456789")
    assert subprocess.run([*INVOKE, "lock-models", "--models", "demo"], cwd=project.dir, env=env, capture_output=True).returncode == 0
    # Addresses nothing answers on: a dry run that tried to connect would fail these hosts.
    (tmp_path / "hosts.yml").write_text("all:\n  hosts:\n    gpu-1: {ansible_host: 192.0.2.1, prefix: /opt/bh}\n    gpu-2: {ansible_host: 192.0.2.2, models_dir: /nvme/models}\n")
    base = ["--inventory", str(tmp_path / "hosts.yml"), "--hosts", "gpu-1,gpu-2", "--models", "demo", "--connect-timeout", "1", "--dry-run"]
    fetch = subprocess.run([*INVOKE, "fetch-models", *base], cwd=project.dir, env=env, capture_output=True, text=True, timeout=300)
    assert fetch.returncode == 0, fetch.stdout + fetch.stderr
    out = fetch.stdout
    assert "# gpu-1 (bare, root@192.0.2.1:22)" in out and "# gpu-2 (bare, root@192.0.2.2:22)" in out
    for line in ("/opt/bh/venv/bin/python -m pip install --quiet --no-index --no-deps --force-reinstall /opt/bh/wheelhouse/",
                 " /opt/bh/wheelhouse/bakehouse-0.1.0-py3-none-any.whl ", "python3 -m venv /opt/bh/venv", "sh /opt/bh/models.lock    # stdin: (not shown)",
                 "/opt/bh/venv/bin/python -m ops.models fetch --lock /opt/bh/models.lock --dest /srv/models --json --env-stdin --models demo    # stdin: (not shown)",
                 "--dest /nvme/models --json --env-stdin --models demo"):
        assert line in out, line
    assert "hf_DryRunSecret" not in out + fetch.stderr and "cannot reach" not in out
    verify = subprocess.run([*INVOKE, "verify-models", *base, "--full"], cwd=project.dir, env=env, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "ops.models verify --lock /opt/bakehouse/models.lock --dest /nvme/models --json --env-stdin --models demo --full    # stdin: (not shown)" in verify.stdout
    assert "hf_DryRunSecret" not in verify.stdout + verify.stderr
