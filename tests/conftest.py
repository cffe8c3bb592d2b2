"""Real servers on loopback: olah as the hub (with fixture repos), git + git-lfs over file://."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.containers import PODMAN, Engine, ensure_base_image, load_image, source_tree, start_docker
from testbed.helpers import HF_DEMO, HF_RANDOM_LM, HF_SHARDS, Hub, Project, manifest, start_hub
from testbed.sshhosts import client_keys, ensure_host_image


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = start_hub(tmp_path_factory.mktemp("hub"))
    yield h
    h.hub.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A client key pair and an empty known_hosts for a module's SSH hosts (the host image built once)."""
    ensure_host_image()
    return client_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def models_store(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A project with the demo model and an untrained GPT-2 (4096-token context) locked and fetched: what the app tests serve."""
    p = Project(tmp_path_factory.mktemp("models") / "project", hub.endpoint)
    p.dir.mkdir()
    p.write_manifest(manifest(demo=HF_DEMO, random=HF_RANDOM_LM))
    assert p.run("lock", "--models", "demo,random").returncode == 0
    assert p.run("fetch", "--models", "demo,random").returncode == 0
    return p


@pytest.fixture
def private_hub(tmp_path: Path) -> Iterator[Hub]:
    """A hub of the test's own, for tests that stop it."""
    h = start_hub(tmp_path / "hub")
    yield h
    h.hub.stop()


@pytest.fixture
def project(tmp_path: Path, hub: Hub) -> Project:
    p = Project(tmp_path / "project", hub.endpoint)
    p.dir.mkdir()
    p.write_manifest(manifest(demo=HF_DEMO, shards=HF_SHARDS))
    return p


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Read-only bind mounts of directories (even root cannot write them), removed after the test."""
    mounts: list[Path] = []

    def mount(src: Path) -> Path:
        dst = tmp_path / f"ro{len(mounts)}"
        dst.mkdir()
        subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(dst)], check=True)
        mounts.append(dst)
        return dst

    yield mount
    for m in mounts:
        subprocess.run(["umount", "-l", str(m)], check=False)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A Docker engine for the tests: the one answering, else a dockerd of their own, stopped at the end; the local base image loaded."""
    root = Path(tempfile.mkdtemp(prefix="bh-dockerd-", dir="/tmp"))  # short: the daemon's sockets live under it
    daemon = start_docker(root)
    try:
        load_image(daemon.engine, ensure_base_image())
        yield daemon.engine
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", params=["podman", "docker"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Module-scoped and parametrized: a module's podman tests all run, then its Docker tests."""
    if request.param == "podman":
        ensure_base_image()
        return PODMAN
    return request.getfixturevalue("docker_engine")


@pytest.fixture(scope="session")
def broken_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This project with an app that crashes at start: a release that can never become ready."""
    src = source_tree(tmp_path_factory.mktemp("broken"))
    entry = src / "app" / "entrypoint.py"
    entry.write_text(entry.read_text().replace("def main(", "def main(*args, **kwargs):\n    raise SystemExit('boom: this release is broken')\n\n\ndef _unused_main(", 1))
    return src
