"""`python -m app.entrypoint` start paths, and the app's readiness while loading or refusing."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from testbed.appserver import start_app
from testbed.helpers import HF_DEMO, ROOT, Hub, Project, manifest


@pytest.fixture
def demo_project(project: Project) -> Project:
    project.write_manifest(manifest(demo=HF_DEMO))
    assert project.run("lock", "--models", "demo").returncode == 0
    return project


def env_for(project: Project, **extra: str) -> dict[str, str]:
    return project.env(**{"BAKEHOUSE_LOCK": str(project.dir / "models.lock"), "MODEL": "demo", **extra})


def test_fetches_when_missing_then_serves(demo_project: Project, tmp_path: Path) -> None:
    server = start_app(env_for(demo_project), tmp_path / "log")
    try:
        server.wait()
        assert (demo_project.store / "demo" / "current" / "model.safetensors").is_file()
    finally:
        server.stop()
    log = server.output()
    for step in ("entrypoint: quick verify:", "entrypoint: fetch:", "readahead:", "loaded demo from"):
        assert step in log


def test_read_only_store_that_verifies_starts_without_network(demo_project: Project, read_only, tmp_path: Path) -> None:
    assert demo_project.run("fetch", "--models", "demo").returncode == 0
    ro = read_only(demo_project.store)
    server = start_app(env_for(demo_project, MODELS_DIR=str(ro), HF_ENDPOINT="http://127.0.0.1:9"), tmp_path / "log")
    try:
        server.wait()
    finally:
        server.stop()
    assert "entrypoint: fetch:" not in server.output()


def test_read_only_store_that_does_not_verify_exits_with_the_message(demo_project: Project, read_only, tmp_path: Path) -> None:
    assert demo_project.run("fetch", "--models", "demo").returncode == 0
    weights = demo_project.store / "demo" / "current" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[5000] ^= 0xFF
    weights.write_bytes(bytes(data))
    ro = read_only(demo_project.store)
    server = start_app(env_for(demo_project, MODELS_DIR=str(ro)), tmp_path / "log")
    assert server.process.wait(timeout=120) == 1
    assert "read-only" in server.output() and "model.safetensors: sha256" in server.output()


def test_health_answers_while_a_fetch_holds_the_model(demo_project: Project, tmp_path: Path) -> None:
    """The server waits for an in-progress fetch of its model (it holds the store's lock) before verifying."""
    assert demo_project.run("fetch", "--models", "demo").returncode == 0
    lock_file = open(demo_project.store / ".staging" / "demo.lock", "w")  # noqa: SIM115  # held across the start, closed in finally
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    server = start_app(env_for(demo_project), tmp_path / "log")
    try:
        health = server.wait("/health", 200)
        assert health.json()["state"] == "waiting"
        ready = server.get("/ready")
        assert ready.status_code == 503 and "waiting for a fetch" in ready.json()["reason"]
        r = server.get("/v1/models")
        assert r.status_code == 200
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        server.wait()
    finally:
        lock_file.close()
        server.stop()


def test_modified_store_makes_ready_503_without_loading(demo_project: Project, tmp_path: Path) -> None:
    """The store is damaged after the entrypoint's own check passed: the app refuses to load it."""
    assert demo_project.run("fetch", "--models", "demo").returncode == 0
    lock_file = open(demo_project.store / ".staging" / "demo.lock", "w")  # noqa: SIM115  # held across the start, closed in finally
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    server = start_app(env_for(demo_project, BAKEHOUSE_AUTO_FETCH="0"), tmp_path / "log")
    try:
        server.wait("/health", 200)
        with open(demo_project.store / "demo" / "current" / "config.json", "a") as f:
            f.write(" ")
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        ready = server.wait("/ready", 503)
        while ready.json()["state"] != "failed":
            ready = server.wait("/ready", 503)
        assert "config.json: size" in ready.json()["reason"]
        r = server.get("/health")
        assert r.status_code == 200
        completion = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x"})
        assert completion.status_code == 503 and "not ready" in completion.json()["error"]["message"]
    finally:
        lock_file.close()
        server.stop()
    assert "loaded demo" not in server.output()


def test_missing_model_without_auto_fetch_exits_1(demo_project: Project, tmp_path: Path) -> None:
    server = start_app(env_for(demo_project, BAKEHOUSE_AUTO_FETCH="0"), tmp_path / "log")
    assert server.process.wait(timeout=60) == 1
    assert "BAKEHOUSE_AUTO_FETCH is off" in server.output()


def test_unknown_model_exits_2(demo_project: Project, tmp_path: Path) -> None:
    server = start_app(env_for(demo_project, MODEL="nope"), tmp_path / "log")
    assert server.process.wait(timeout=60) == 2
    assert "MODEL='nope' is not in" in server.output()


@pytest.mark.slow
def test_seed_git_variables_fetch_verify_and_serve(hub: Hub, tmp_path: Path) -> None:
    """The first seed's GIT_REPO_URL / GIT_BRANCH / MODEL_FILE, without any models.lock."""
    repo = tmp_path / "remote.git"
    shutil.copytree(hub.hub.repo_path("bakehouse/demo-tiny"), repo)
    env = {"MODELS_DIR": str(tmp_path / "models"), "MODEL": "neuroq", "GIT_REPO_URL": f"file://{repo}", "GIT_BRANCH": "main", "MODEL_FILE": "model.safetensors"}
    server = start_app(env, tmp_path / "log")
    try:
        server.wait()
    finally:
        server.stop()
    weights = tmp_path / "models" / "neuroq" / "current" / "model.safetensors"
    assert weights.read_bytes() == (Path(__file__).parent.parent / "demo" / "demo-tiny" / "model.safetensors").read_bytes()

    # The remote is gone: the next start serves the copy resolved and verified last time.
    repo.rename(tmp_path / "moved.git")
    again = start_app(env, tmp_path / "log2")
    try:
        again.wait()
    finally:
        again.stop()
    assert "serving neuroq as resolved at the last start" in again.output()


def test_serverless_handler(demo_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    assert demo_project.run("fetch", "--models", "demo").returncode == 0
    for key, value in env_for(demo_project, HF_HUB_OFFLINE="1").items():
        monkeypatch.setenv(key, value)
    from app import handler

    handler.scheduler.cache_clear()
    out = handler.handler({"input": {"prompt": "The weights are", "max_tokens": 8}})
    assert out["text"].startswith(" locked, fetched") and out["usage"]["completion_tokens"] == 8
    assert "error" in handler.handler({"input": {"prompt": "", "max_tokens": 8}})
    assert "error" in handler.handler({"input": {"prompt": "x", "max_tokens": 0}})
    assert "error" in handler.handler({"prompt": "x"})
    handler.scheduler.cache_clear()


@pytest.mark.slow
def test_the_runpod_sdk_runs_the_handler_in_its_local_test_mode(demo_project: Project) -> None:
    """The first seed ran its handler under the RunPod worker SDK: its local test mode runs ours, once, and logs the job's result."""
    assert demo_project.run("fetch", "--models", "demo").returncode == 0
    env = env_for(demo_project, HF_HUB_OFFLINE="1")
    job = {"input": {"prompt": "The weights are", "max_tokens": 8}}
    expected = {"output": {"text": " locked, fetched, verified", "finish_reason": "length",
                           "usage": {"prompt_tokens": 3, "completion_tokens": 8}}}
    worker = [sys.executable, "-m", "app.handler", "--test_input", json.dumps(job)]
    ok = subprocess.run(worker, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"Job result: {expected}" in ok.stdout and "Local testing complete" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "app.handler", "--test_input", json.dumps({"input": {"prompt": "x", "max_tokens": 0}})],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 1 and "max_tokens must be between 1 and" in bad.stdout + bad.stderr
