"""`invoke deploy` / `rollback` to a Docker host: this machine over SSH, with podman and with a Docker engine, images pulled from a registry with auth."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ops.net import free_port
from testbed.containers import BASE_IMAGE, Engine, RegistryServer, source_tree, start_registry
from testbed.helpers import ROOT, TOKEN, Hub, Project
from testbed.load import Load
from testbed.sshhosts import LocalSshd, client_keys, start_local_sshd

pytestmark = pytest.mark.containers

CA = "/etc/ssl/certs/ca-certificates.crt"
PASSWORD = "deploy-Passw0rd-4e5f"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    r = start_registry(tmp_path_factory.mktemp("registry"), "deployer", PASSWORD)
    yield r
    r.stop()


def registry_env(reg: RegistryServer) -> dict[str, str]:
    return {"BAKEHOUSE_REGISTRY": reg.host, "BAKEHOUSE_REGISTRY_USER": reg.user, "BAKEHOUSE_REGISTRY_PASSWORD": reg.password, "BAKEHOUSE_REGISTRY_INSECURE": "1"}


@pytest.fixture(scope="module")
def images(engine: Engine, tmp_path_factory: pytest.TempPathFactory, hub: Hub, registry: RegistryServer) -> dict[str, str]:
    """The real unbaked image, and one whose settings make the app exit at start; all pushed (the image name is bakehouse, as deploy pulls)."""
    src = source_tree(tmp_path_factory.mktemp("src"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "BAKEHOUSE_"))}, "HF_ENDPOINT": hub.endpoint, "BAKEHOUSE_BASE_IMAGE": BASE_IMAGE,
           **engine.env}
    tags = {"good": f"{engine.name}-good", "bad": f"{engine.name}-bad", "good2": f"{engine.name}-good2"}
    build = subprocess.run([sys.executable, "-m", "invoke", "build", "--engine", engine.name, "--ca-bundle", CA, "--tag", f"localhost/bakehouse:{tags['good']}"],
                           cwd=src, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (src / "Bad.Containerfile").write_text(f"FROM localhost/bakehouse:{tags['good']}\nENV BAKEHOUSE_MAX_BATCH=many\n")
    engine.cli("build", *(["--format", "docker"] if engine.name == "podman" else []), "-t", f"localhost/bakehouse:{tags['bad']}", "-f", str(src / "Bad.Containerfile"), str(src))
    engine.cli("tag", f"localhost/bakehouse:{tags['good']}", f"localhost/bakehouse:{tags['good2']}")
    for tag in tags.values():
        push = subprocess.run([sys.executable, "-m", "invoke", "push", "--engine", engine.name, "--tag", f"localhost/bakehouse:{tag}"],
                              cwd=src, env={**env, **registry_env(registry)}, capture_output=True, text=True, timeout=600, check=False)
        assert push.returncode == 0, push.stdout + push.stderr
    return tags


@pytest.fixture(scope="module")
def dock(engine: Engine, tmp_path_factory: pytest.TempPathFactory, hub: Hub) -> Iterator[tuple[Project, Path, int, str]]:
    """A project whose inventory holds one Docker host: this machine, reached over SSH, running the engine."""
    root = tmp_path_factory.mktemp("dock")
    keys = client_keys(root / "keys")
    # The engine's daemon may listen on a socket of the tests' own; its client config stays in the test's directory.
    session_env = {**({"DOCKER_HOST": engine.env["DOCKER_HOST"]} if "DOCKER_HOST" in engine.env else {}), "DOCKER_CONFIG": str(root / "docker-config")}
    sshd: LocalSshd = start_local_sshd(root / "sshd", keys, env=session_env)
    project = Project(root / "project", hub.endpoint)
    project.dir.mkdir()
    port, a, b = free_port(), free_port(), free_port()
    container = f"bakehouse-deploy-{port}"
    for rollout in ("blue-green", "hold"):
        (project.dir / f"{rollout}.yml").write_text(
            "all:\n  children:\n    gpu:\n      hosts:\n        dock:\n"
            f"          ansible_host: 127.0.0.1\n          ansible_port: {sshd.port}\n          ansible_ssh_private_key_file: {keys / 'id'}\n"
            f"          runtime: docker\n          engine: {engine.name}\n          port: {port}\n          instance_ports: [{a}, {b}]\n"
            f"          container: {container}\n          rollout: {rollout}\n"
            f"          prefix: {root / 'opt'}\n          models_dir: {root / 'models'}\n          ready_timeout: 240\n"
        )
    yield project, keys, port, container
    for name in (f"{container}-{a}", f"{container}-{b}", f"{container}-proxy"):
        engine.cli("rm", "-f", name, check=False)
    sshd.stop()


def deploy(dock: tuple[Project, Path, int, str], registry: RegistryServer, command: str, *flags: str, rollout: str = "blue-green") -> subprocess.CompletedProcess[str]:
    project, keys, _, _ = dock
    argv = [sys.executable, "-m", "invoke", "--search-root", str(ROOT), command, "--inventory", f"{rollout}.yml", "--known-hosts", str(keys / "known_hosts"),
            "--hosts", "dock", *flags]
    env = project.env(HF_TOKEN=TOKEN, **registry_env(registry))
    return subprocess.run(argv, cwd=project.dir, env=env, capture_output=True, text=True, timeout=900, check=False)


def row(out: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith("dock "))


def running_image(engine: Engine, dock: tuple[Project, Path, int, str]) -> str:
    """The image of the instance the last deploy made active."""
    project, _, _, container = dock
    [prefix] = re.findall(r"prefix: (\S+)", (project.dir / "blue-green.yml").read_text())
    port = (Path(prefix) / f"{container}.active").read_text().strip()
    return engine.cli("inspect", "--format", "{{.Config.Image}}", f"{container}-{port}").stdout.strip()


def under_load(port: int, action: Callable[[], subprocess.CompletedProcess[str]]) -> subprocess.CompletedProcess[str]:
    r, report = Load(f"http://127.0.0.1:{port}", clients=4).during(action)
    assert not report.problems(), f"{report.problems()}\n{r.stdout}{r.stderr}"
    return r


def ready(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code
    except httpx.TransportError:
        return 0


def test_docker_host_deploys_gate_and_roll_back_without_failing_a_request(engine: Engine, dock: tuple[Project, Path, int, str],
                                                                          registry: RegistryServer, images: dict[str, str]) -> None:
    _, _, port, container = dock
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # every process on this machine (the Docker host) while deploys run
        while not stop.is_set():
            seen.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        good = deploy(dock, registry, "deploy", "--tag", images["good"])
        assert good.returncode == 0, good.stdout + good.stderr
        bad = under_load(port, lambda: deploy(dock, registry, "deploy", "--tag", images["bad"]))
    finally:
        stop.set()
        watcher.join()
    assert row(good.stdout)[:5] == ["dock", "docker", "-", images["good"], "deployed"]
    assert engine.exists(f"{container}-proxy")

    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert row(bad.stdout)[:6] == ["dock", "docker", images["good"], images["bad"], "rolled", "back"]
    assert "BAKEHOUSE_MAX_BATCH" in bad.stdout
    assert running_image(engine, dock).endswith(f":{images['good']}") and ready(port) == 200

    for text in [*seen, good.stdout + good.stderr, bad.stdout + bad.stderr]:
        assert PASSWORD not in text and TOKEN not in text

    newer = under_load(port, lambda: deploy(dock, registry, "deploy", "--tag", images["good2"]))
    assert newer.returncode == 0 and row(newer.stdout)[:5] == ["dock", "docker", images["good"], images["good2"], "deployed"], newer.stdout
    back = under_load(port, lambda: deploy(dock, registry, "rollback", rollout="hold"))
    assert back.returncode == 0, back.stdout + back.stderr
    assert row(back.stdout)[:5] == ["dock", "docker", images["good2"], images["good"], "reverted"] and row(back.stdout)[-2].endswith("s")
    assert running_image(engine, dock).endswith(f":{images['good']}") and ready(port) == 200
    completion = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 3}, timeout=60)
    assert completion.status_code == 200
