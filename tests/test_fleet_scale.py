"""One controller, a hundred hosts: a fetch and a verify of a tiny model, every row present, the exit code right, the output readable."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.fleetsim import SimFleet, start_fleet
from testbed.helpers import HF_DEMO, ROOT, Hub, Project, manifest
from testbed.sshhosts import client_keys

pytestmark = pytest.mark.hosts

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
HOSTS = 100


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return client_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def fleet(keys: Path) -> Iterator[SimFleet]:
    f = start_fleet(HOSTS, keys)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def site(hub: Hub, fleet: SimFleet, keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    p = Project(tmp_path_factory.mktemp("scale") / "project", hub.endpoint)
    p.dir.mkdir()
    p.write_manifest(manifest(demo=HF_DEMO))
    assert p.run("lock", "--models", "demo").returncode == 0
    fleet.inventory(p.dir / "hosts.yml", keys, down=1)
    return p


def run(site: Project, keys: Path, command: str, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [*INVOKE, command, "--inventory", "hosts.yml", "--known-hosts", str(keys / "known_hosts"), "--group", "sim", "--models", "demo",
            "--parallel", "16", "--connect-timeout", "15", *flags]  # a live host slow to answer on a loaded CI machine is not the down one
    return subprocess.run(argv, cwd=site.dir, env=site.env(BAKEHOUSE_PROGRESS_SECONDS="2"), capture_output=True, text=True, timeout=1200, check=False)


def test_a_hundred_hosts_fetch_then_verify(site: Project, keys: Path, fleet: SimFleet) -> None:
    r = run(site, keys, "fetch-models")
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    rows = {line.split()[0]: line.split()[2] for line in lines[1 : HOSTS + 2]}
    odd = {name: row for name, row in rows.items() if row != ("FAILED" if name == "down0" else "downloaded")}
    assert len(rows) == HOSTS + 1 and not odd, (odd, r.stdout[-3000:])
    assert f"{HOSTS + 1} host(s), 1 failed (exit 3); downloaded {HOSTS}, FAILED 1" in r.stdout
    assert "down0: cannot reach 127.0.0.1" in r.stdout
    # Readable at a hundred hosts: running counts and the failure, not every host's lines.
    assert f"fetch: {HOSTS + 1}/{HOSTS + 1} host(s) done ({HOSTS} ok, 1 failed), 0 running" in r.stderr
    assert "[down0] FAILED" in r.stderr and "[sim050]" not in r.stderr

    v = run(site, keys, "verify-models", "--json")
    assert v.returncode == 3, v.stderr[-3000:]
    report = json.loads(v.stdout)
    assert report["exit_code"] == 3 and len(report["hosts"]) == HOSTS + 1
    verified = [h for h in report["hosts"] if h["ok"]]
    assert len(verified) == HOSTS, [h for h in report["hosts"] if not h["ok"] and h["host"] != "down0"]
    assert all(h["outcomes"][0]["status"] == "verified (quick)" and h["bootstrap"] == "unchanged" for h in verified)
