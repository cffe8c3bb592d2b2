"""Real servers on loopback: olah as the hub (with fixture repos), git + git-lfs over file://."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import HF_DEMO, HF_SHARDS, Hub, Project, manifest, start_hub


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = start_hub(tmp_path_factory.mktemp("hub"))
    yield h
    h.hub.stop()


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
