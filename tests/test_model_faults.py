"""Every failure the model commands promise to handle, caused for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.helpers import HF_BIG, HF_DEMO, HF_SHARDS, Hub, Project, manifest, shard_files
from testbed.proxy import Proxy

SHARD = "model-00001-of-00004.safetensors"


@pytest.fixture
def fetched(project: Project) -> Project:
    assert project.run("lock", "--models", "demo,shards").returncode == 0
    assert project.run("fetch", "--models", "demo,shards").returncode == 0
    return project


def current(project: Project, model: str = "shards") -> Path:
    return project.store / model / "current"


def test_flipped_byte_fails_quick_verify_naming_the_file(fetched: Project) -> None:
    path = current(fetched) / SHARD
    with open(path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = fetched.run("verify", "--models", "shards")
    assert r.returncode == 1
    assert f"{SHARD}: sha256" in r.stdout and "expected" in r.stdout


def test_truncated_missing_and_extra_files(fetched: Project) -> None:
    d = current(fetched)
    os.truncate(d / SHARD, 100)
    (d / "config.json").unlink()
    (d / "notes.txt").write_text("left by hand")
    r = fetched.run("verify", "--models", "shards", "--json")
    assert r.returncode == 1
    model = json.loads(r.stdout)["models"][0]
    assert any(f"{SHARD}: size 100 bytes, expected" in p for p in model["problems"])
    assert any(p.startswith("config.json: missing") for p in model["problems"])
    assert any("notes.txt: extra file" in w for w in model["warnings"])


def test_extra_file_alone_is_only_a_warning(fetched: Project) -> None:
    (current(fetched) / "README.md").write_text("hi")
    r = fetched.run("verify", "--models", "shards", "--full")
    assert r.returncode == 0
    assert "warn README.md: extra file" in r.stdout


def test_lfs_pointer_is_reported_by_name(fetched: Project, hub: Hub) -> None:
    """The first seed's failure: a 132-byte pointer shipped where the weights should be."""
    pointer = subprocess.run(["git", "-C", str(hub.hub.repo_path("test/shards")), "cat-file", "blob", f"HEAD:{SHARD}"], capture_output=True, check=True).stdout
    (current(fetched) / SHARD).write_bytes(pointer)
    r = fetched.run("verify", "--models", "shards")
    assert r.returncode == 1
    assert f"{SHARD}: is a Git LFS pointer file ({len(pointer)} bytes)" in r.stdout
    assert "git lfs pull" in r.stdout and "fetch-models" in r.stdout


def test_symlink_out_of_the_store_is_refused(fetched: Project, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_bytes(shard_files()["config.json"])
    target = current(fetched) / "config.json"
    target.unlink()
    target.symlink_to(outside)
    r = fetched.run("verify", "--models", "shards", "--full")
    assert r.returncode == 1
    assert "config.json: is a symlink" in r.stdout


def test_fetch_repairs_only_the_damaged_file(fetched: Project, hub: Hub) -> None:
    d = current(fetched)
    os.truncate(d / SHARD, 10)
    proxy = Proxy(hub.endpoint).start()
    try:
        r = fetched.run("fetch", "--models", "shards", env=fetched.env(HF_ENDPOINT=proxy.url))
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stderr
    assert [req.path.rsplit("/", 1)[-1] for req in proxy.requests if "/resolve/" in req.path] == [SHARD]
    assert (current(fetched) / SHARD).read_bytes() == shard_files()[SHARD]
    assert fetched.run("verify", "--models", "shards", "--full").returncode == 0


def test_stale_lock_after_manifest_edit(fetched: Project) -> None:
    fetched.write_manifest(manifest(demo=HF_DEMO + '\ninclude = ["*.json"]', shards=HF_SHARDS))
    r = fetched.run("fetch", "--models", "demo")
    assert r.returncode == 2
    assert "lock-models --models demo" in r.stderr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[models.demo\nsource = 1", "line 1"),
        ('[models.demo]\nsource = "hf://a/b"\nrevision = "main"\nrevison = "x"\n', "models.demo.revison"),
        ('[models.demo]\nsource = "s3://bucket/x"\nrevision = "main"\n', "models.demo.source"),
    ],
)
def test_bad_models_toml_exits_2_naming_line_or_key(project: Project, text: str, needle: str) -> None:
    project.write_manifest(text)
    r = project.run("lock")
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_lock_and_unknown_model(project: Project) -> None:
    r = project.run("fetch", "--models", "demo")
    assert r.returncode == 2 and "models.lock: not found" in r.stderr and "lock-models" in r.stderr
    project.run("lock", "--models", "demo")
    r = project.run("fetch", "--models", "nope")
    assert r.returncode == 2 and "no entry for 'nope'" in r.stderr


def test_unknown_flag_exits_2(project: Project) -> None:
    assert project.run("fetch", "--modles", "demo").returncode == 2


def test_hub_unreachable_exits_3(project: Project) -> None:
    project.run("lock", "--models", "demo")
    env = project.env(HF_ENDPOINT="http://127.0.0.1:9")
    for args in (["fetch", "--models", "demo"], ["lock", "--models", "demo"]):
        r = project.run(*args, env=env)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "127.0.0.1:9" in r.stdout + r.stderr and "reachable" in r.stdout + r.stderr
        assert "Traceback" not in r.stderr
    assert not (project.store / "demo" / "current").exists()


def test_repository_not_found_exits_3(project: Project) -> None:
    project.write_manifest(manifest(ghost='source = "hf://nobody/ghost"\nrevision = "main"'))
    r = project.run("lock", "--models", "ghost")
    assert r.returncode == 3
    assert "hf://nobody/ghost" in r.stdout and "HF_TOKEN" in r.stdout


def test_offline_mode_refuses_downloads_but_serves_verified(project: Project) -> None:
    project.run("lock", "--models", "demo,shards")
    assert project.run("fetch", "--models", "demo").returncode == 0
    env = project.env(HF_HUB_OFFLINE="1")
    assert project.run("fetch", "--models", "demo", env=env).returncode == 0
    r = project.run("fetch", "--models", "shards", env=env)
    assert r.returncode == 3 and "HF_HUB_OFFLINE" in r.stdout


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_refuses_before_downloading(project: Project, tiny_disk: Path) -> None:
    project.run("lock", "--models", "shards")
    r = project.run("fetch", "--models", "shards", "--dest", str(tiny_disk))
    assert r.returncode == 4, r.stdout + r.stderr
    assert "need 8.0 MB, have 5.2 MB at " + str(tiny_disk) in r.stderr
    assert sorted(p.name for p in tiny_disk.iterdir()) == [".staging"]
    assert not any(p.is_file() and not p.name.endswith(".lock") for p in tiny_disk.rglob("*"))


def test_kill_9_mid_download_then_resume(project: Project, hub: Hub) -> None:
    """Kill the fetch while shards stream over a slow link; the re-run resumes with Range and activates only verified files."""
    slow = Proxy(hub.endpoint, rate=12_000_000).start()
    env = project.env(HF_ENDPOINT=slow.url)
    project.write_manifest(manifest(big=HF_BIG))
    commit = hub.commits["test/big"]
    partial = project.store / ".staging" / "big" / f"{commit}.partial"
    try:
        assert project.run("lock", "--models", "big", env=env).returncode == 0
        proc = project.popen("fetch", "--models", "big", env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(p.stat().st_size for p in partial.glob("*.safetensors")) < 10_000_000:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kept = {p.name: p.stat().st_size for p in partial.glob("*.safetensors") if p.stat().st_size}
        assert kept and all(size < 24_000_128 for size in kept.values())
        assert not (project.store / "big" / "current").exists()
        assert not (project.store / "big" / commit).exists()
        first_run = len(slow.requests)
        r = project.run("fetch", "--models", "big", env=env)
        assert r.returncode == 0, r.stderr
    finally:
        slow.stop()
    rerun = [req for req in slow.requests[first_run:] if req.path.endswith(".safetensors")]
    assert {req.path.rsplit("/", 1)[-1]: req.range for req in rerun if req.range} == {name: f"bytes={size}-" for name, size in kept.items()}
    total = sum(len(v) for k, v in shard_files(n=2, mb=24, seed=1).items() if k.endswith(".safetensors"))
    assert sum(req.bytes_sent for req in rerun) == total - sum(kept.values())
    assert project.run("verify", "--models", "big", "--full").returncode == 0


def test_progress_lines_without_a_terminal(project: Project, hub: Hub) -> None:
    slow = Proxy(hub.endpoint, rate=8_000_000).start()
    try:
        env = project.env(HF_ENDPOINT=slow.url, BAKEHOUSE_PROGRESS_SECONDS="0.5")
        project.write_manifest(manifest(big=HF_BIG))
        project.run("lock", "--models", "big", env=env)
        r = project.run("fetch", "--models", "big", env=env)
    finally:
        slow.stop()
    assert r.returncode == 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("fetch big: ")]
    assert lines, r.stderr
    assert all(" / 48.0 MB (" in line and "/s, ETA " in line for line in lines)
    assert "\r" not in r.stderr
