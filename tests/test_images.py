"""`invoke build` and `invoke push` for real, on podman and on a Docker engine (BuildKit): the local hub, a registry with htpasswd auth."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ops.net import free_port
from testbed.containers import (
    BASE_IMAGE,
    Engine,
    RegistryServer,
    blob_uploads,
    exec_json,
    source_tree,
    start_registry,
    wait_ready_inside,
)
from testbed.helpers import ROOT, TOKEN, Hub, Project
from testbed.proxy import Proxy

pytestmark = pytest.mark.containers

CA = "/etc/ssl/certs/ca-certificates.crt"


@dataclass
class Built:
    image: str
    output: str


def invoke(src: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=src, env=env, capture_output=True, text=True, timeout=1200)


def build(engine: Engine, src: Path, env: dict[str, str], *flags: str) -> Built:
    r = invoke(src, "build", "--engine", engine.name, "--ca-bundle", CA, *flags, env={**env, **engine.env})
    assert r.returncode == 0, r.stdout + r.stderr[-5000:]
    image = re.search(r"^image: (\S+)", r.stdout, re.M).group(1)
    return Built(image, r.stdout + r.stderr)


def name(engine: Engine, tag: str) -> str:
    """Each engine's images in their own repository, so one engine's pushes never count as the other's."""
    return f"localhost/bakehouse-{engine.name}:{tag}"


@pytest.fixture(scope="module")
def src(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return source_tree(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def counting_hub(hub: Hub) -> Iterator[Proxy]:
    proxy = Proxy(hub.endpoint).start()
    yield proxy
    proxy.stop()


def build_env(hub_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "BAKEHOUSE_"))}
    return {**env, "HF_ENDPOINT": hub_url, "HF_TOKEN": TOKEN, "BAKEHOUSE_BASE_IMAGE": BASE_IMAGE, **extra}


@pytest.fixture(scope="module")
def baked(engine: Engine, src: Path, counting_hub: Proxy) -> Built:
    return build(engine, src, build_env(counting_hub.url), "--bake", "--tag", name(engine, "baked"))


@pytest.fixture(scope="module")
def rebuilt(engine: Engine, src: Path, counting_hub: Proxy, baked: Built) -> tuple[Built, int]:
    """The same build after a change to app/ code; returns it and the hub requests it made."""
    before = len(counting_hub.requests)
    with open(src / "app" / "__init__.py", "a") as f:
        f.write("# a code-only change\n")
    again = build(engine, src, build_env(counting_hub.url), "--bake", "--tag", name(engine, "rebuilt"))
    return again, len(counting_hub.requests) - before


@pytest.fixture
def container(engine: Engine) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for n in names:
        engine.cli("rm", "-f", n, check=False)


def run_container(engine: Engine, names: list[str], image: str, *args: str) -> str:
    n = f"bakehouse-test-{os.getpid()}-{len(names)}"
    names.append(n)
    engine.cli("run", "-d", "--name", n, *args, image)
    return n


def test_baked_image_serves_a_completion_with_no_network(engine: Engine, baked: Built, container: list[str]) -> None:
    assert "baked: demo" in baked.output
    n = run_container(engine, container, baked.image, "--network", "none")
    wait_ready_inside(n, engine=engine)
    status, body = exec_json(n, "/v1/completions", {"model": "demo", "prompt": "The weights are", "max_tokens": 12, "temperature": 0}, engine=engine)
    assert status == 200 and body["choices"][0]["text"].startswith(" locked, fetched, verified")
    labels = engine.cli("image", "inspect", "--format", "{{json .Config.Labels}}", baked.image).stdout
    assert '"dev.bakehouse.models":"demo"' in labels and "org.opencontainers.image.revision" in labels


def test_code_change_rebuild_reuses_the_model_layer_without_the_hub(engine: Engine, baked: Built, rebuilt: tuple[Built, int]) -> None:
    again, hub_requests = rebuilt
    assert hub_requests == 0
    assert "model layer: reused from cache" in again.output
    old, new = engine.layers(baked.image), engine.layers(again.image)
    shared = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), len(old))
    assert shared >= len(old) - 2, f"only {shared} of {len(old)} layers reused"


def test_the_build_secrets_are_in_no_layer_and_no_history(engine: Engine, baked: Built, counting_hub: Proxy, tmp_path: Path) -> None:
    history = engine.cli("history", "--no-trunc", "--format", "{{.CreatedBy}}", baked.image).stdout
    assert TOKEN not in history and counting_hub.url not in history
    archive = tmp_path / "image.tar"
    engine.save(baked.image, archive)
    needles, tail = [TOKEN.encode(), counting_hub.url.encode()], b""
    with open(archive, "rb") as f:
        while chunk := f.read(8 << 20):
            assert not any(needle in tail + chunk for needle in needles)
            tail = chunk[-64:]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    r = start_registry(tmp_path_factory.mktemp("registry"), "ci", "registry-Passw0rd")
    yield r
    r.stop()


def registry_env(reg: RegistryServer, password: str | None = None) -> dict[str, str]:
    return {**os.environ, "BAKEHOUSE_REGISTRY": reg.host, "BAKEHOUSE_REGISTRY_USER": reg.user,
            "BAKEHOUSE_REGISTRY_PASSWORD": password or reg.password, "BAKEHOUSE_REGISTRY_INSECURE": "1"}


def test_push_with_auth_uploads_only_changed_layers(engine: Engine, src: Path, baked: Built, rebuilt: tuple[Built, int], registry: RegistryServer) -> None:
    first = invoke(src, "push", "--engine", engine.name, "--tag", baked.image, env={**registry_env(registry), **engine.env})
    assert first.returncode == 0, first.stdout + first.stderr
    uploaded = int(re.search(r"(\d+) layer\(s\) uploaded", first.stdout).group(1))
    assert uploaded == len(engine.layers(baked.image))
    uploads_before = blob_uploads(registry)
    second = invoke(src, "push", "--engine", engine.name, "--tag", rebuilt[0].image, env={**registry_env(registry), **engine.env})
    assert second.returncode == 0, second.stderr
    m = re.search(r"(\d+) layer\(s\) uploaded \(.*?\), (\d+) already in the registry", second.stdout)
    assert 1 <= int(m.group(1)) <= 2 and int(m.group(2)) >= len(engine.layers(baked.image)) - 2
    assert blob_uploads(registry) - uploads_before == int(m.group(1)) + 1  # + the image config
    tags = httpx.get(f"http://{registry.host}/v2/bakehouse-{engine.name}/tags/list", auth=(registry.user, registry.password)).json()["tags"]
    assert baked.image.split(":")[-1] in tags
    for r in (first, second):
        assert registry.password not in r.stdout + r.stderr


def test_push_with_a_wrong_password_fails_clearly(engine: Engine, src: Path, baked: Built, registry: RegistryServer) -> None:
    r = invoke(src, "push", "--engine", engine.name, "--tag", baked.image, env={**registry_env(registry, "wrong-Passw0rd"), **engine.env})
    assert r.returncode != 0
    assert "push to " + registry.host + " failed" in r.stderr and "wrong-Passw0rd" not in r.stdout + r.stderr


@pytest.fixture(scope="module")
def unbaked(engine: Engine, src: Path, hub: Hub, baked: Built) -> Built:
    """Built from a checkout whose weights are Git LFS pointers (the first seed's case): the build must not care."""
    pointer = subprocess.run(["git", "-C", str(hub.hub.repo_path("bakehouse/demo-tiny")), "cat-file", "blob", "HEAD:model.safetensors"], capture_output=True, check=True).stdout
    (src / "models" / "demo").mkdir(parents=True, exist_ok=True)
    (src / "models" / "demo" / "model.safetensors").write_bytes(pointer)
    return build(engine, src, build_env(hub.endpoint), "--tag", name(engine, "unbaked"))


def test_unbaked_image_fetches_at_start_then_serves(engine: Engine, unbaked: Built, hub: Hub, container: list[str]) -> None:
    assert "baked: none" in unbaked.output
    port = free_port()
    n = run_container(engine, container, unbaked.image, "--network", "host", "-e", f"PORT={port}", "-e", f"HF_ENDPOINT={hub.endpoint}", "-e", "HF_HUB_DISABLE_XET=1")
    deadline_ok = False
    for _ in range(360):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                deadline_ok = True
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    logs = engine.logs(n)
    assert deadline_ok, logs
    assert "entrypoint: fetch:" in logs


@pytest.fixture
def host_store(tmp_path: Path, hub: Hub) -> Project:
    """The image's own models.toml and models.lock, fetched on the host: what a mounted volume holds."""
    p = Project(tmp_path / "project", hub.endpoint)
    p.dir.mkdir()
    for name in ("models.toml", "models.lock"):
        shutil.copy(ROOT / name, p.dir / name)
    assert p.run("fetch", "--models", "demo").returncode == 0
    return p


def test_read_only_mount_of_a_good_store_starts_without_downloading(engine: Engine, unbaked: Built, host_store: Project, container: list[str]) -> None:
    n = run_container(engine, container, unbaked.image, "--network", "none", "-v", f"{host_store.store}:/models:ro")
    wait_ready_inside(n, engine=engine)
    assert "entrypoint: fetch:" not in engine.logs(n)


def test_read_only_mount_of_a_corrupted_store_exits_with_the_verify_message(engine: Engine, unbaked: Built, host_store: Project, container: list[str]) -> None:
    weights = host_store.store / "demo" / "current" / "config.json"
    weights.write_text(weights.read_text().replace("gpt2", "gpt3"))
    n = run_container(engine, container, unbaked.image, "--network", "none", "-v", f"{host_store.store}:/models:ro")
    code = engine.cli("wait", n, timeout=180).stdout.strip()
    logs = engine.logs(n)
    assert code == "1", logs
    assert "read-only" in logs and "config.json: sha256" in logs
