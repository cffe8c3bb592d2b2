"""The Invoke tasks users type, run as processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import ROOT, Hub, Project

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


def test_list_shows_every_task_with_help() -> None:
    out = subprocess.run([*INVOKE, "--list"], capture_output=True, text=True, check=True).stdout
    for name in ("lock-models", "fetch-models", "verify-models", "demo", "test"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert len(line.split()) > 2, f"{name} has no help line"


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
    fetch = [*INVOKE, "fetch-models", "--models", "demo", "--manifest", str(project.dir / "models.toml"), "--lock", str(project.dir / "models.lock"), "--dest", str(tmp_path / "store")]
    r = subprocess.run([*fetch, "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and '"status": "downloaded"' in r.stdout
    r = subprocess.run(fetch, env=project.env(HF_ENDPOINT="http://127.0.0.1:9"), capture_output=True, text=True)
    assert r.returncode == 0 and "up-to-date" in r.stdout
    r = subprocess.run([*INVOKE, "verify-models", "--models", "nope", "--lock", str(project.dir / "models.lock")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no entry for 'nope'" in r.stderr
