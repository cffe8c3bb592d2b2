"""lock -> fetch -> verify through `python -m ops.models`, against olah, git-lfs and an HTTP server."""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path

from testbed.helpers import DEMO, HF_DEMO, TOKEN, Hub, Project, manifest, shard_files
from testbed.proxy import Proxy


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lock_of(project: Project) -> dict:
    return tomllib.loads((project.dir / "models.lock").read_text())


def locked_and_fetched(project: Project, models: str = "demo") -> None:
    assert project.run("lock", "--models", models).returncode == 0
    r = project.run("fetch", "--models", models)
    assert r.returncode == 0, r.stderr


def test_lock_pins_commit_and_every_file(project: Project, hub: Hub) -> None:
    r = project.run("lock", "--models", "demo,shards")
    assert r.returncode == 0, r.stderr
    lock = lock_of(project)
    demo, shards = lock["models"]["demo"], lock["models"]["shards"]
    assert demo["commit"] == hub.commits["bakehouse/demo-tiny"]
    expected = {p.name: (p.stat().st_size, sha(p.read_bytes())) for p in DEMO.iterdir()} | {".gitattributes": None}
    got = {f["path"]: (f["size"], f["sha256"]) for f in demo["files"]}
    assert set(got) == set(expected)
    for name, value in expected.items():
        if value:
            assert got[name] == value, name
    assert {f["path"]: f["sha256"] for f in shards["files"] if f["path"].endswith(".safetensors")} == {
        k: sha(v) for k, v in shard_files().items() if k.endswith(".safetensors")
    }


def test_lock_again_reports_unchanged(project: Project) -> None:
    project.run("lock", "--models", "demo")
    r = project.run("lock", "--models", "demo")
    assert "demo @" in r.stdout and "unchanged" in r.stdout


def test_fetch_then_verify(project: Project, hub: Hub) -> None:
    project.run("lock", "--models", "demo,shards")
    r = project.run("fetch", "--models", "demo,shards", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [m["status"] for m in report["models"]] == ["downloaded", "downloaded"]
    commit = hub.commits["test/shards"]
    current = project.store / "shards" / "current"
    assert os.readlink(current) == commit
    for name, data in shard_files().items():
        assert (current / name).read_bytes() == data
    assert (project.store / "shards" / commit / ".verified").is_file()
    assert not (project.store / ".staging" / "shards" / f"{commit}.partial").exists()
    for mode in ([], ["--full"]):
        v = project.run("verify", "--models", "demo,shards", *mode)
        assert v.returncode == 0, v.stdout
        assert "verified (full)" in v.stdout if mode else "verified (quick)" in v.stdout


def test_fetch_uses_manifest_default(project: Project) -> None:
    project.write_manifest('default = ["demo"]\n' + manifest(demo=HF_DEMO))
    project.run("lock")
    r = project.run("fetch", "--json")
    assert [m["model"] for m in json.loads(r.stdout)["models"]] == ["demo"]


def test_refetch_with_hub_stopped_needs_no_network(tmp_path: Path, private_hub: Hub) -> None:
    project = Project(tmp_path / "p", private_hub.endpoint)
    project.dir.mkdir()
    project.write_manifest(manifest(demo=HF_DEMO))
    locked_and_fetched(project)
    private_hub.hub.stop()
    r = project.run("fetch", "--models", "demo", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["models"][0]["status"] == "up-to-date"


def test_up_to_date_fetch_makes_zero_requests(project: Project, hub: Hub) -> None:
    proxy = Proxy(hub.endpoint).start()
    try:
        env = project.env(HF_ENDPOINT=proxy.url)
        assert project.run("lock", "--models", "demo", env=env).returncode == 0
        assert project.run("fetch", "--models", "demo", env=env).returncode == 0
        before = len(proxy.requests)
        assert project.run("fetch", "--models", "demo", env=env).returncode == 0
        assert project.run("verify", "--models", "demo", "--full", env=env).returncode == 0
        assert len(proxy.requests) == before
    finally:
        proxy.stop()


def test_git_lfs_source_matches_hub(project: Project, hub: Hub) -> None:
    git = f'source = "{hub.git_url("test/shards")}"\nrevision = "main"\ninclude = ["*.safetensors", "*.json"]'
    project.write_manifest(manifest(shards=HF_SHARDS_ALL, gshards=git))
    assert project.run("lock", "--models", "shards,gshards").returncode == 0
    lock = lock_of(project)["models"]
    assert lock["gshards"]["commit"] == hub.commits["test/shards"]
    assert lock["gshards"]["files"] == [f for f in lock["shards"]["files"] if f["path"] != ".gitattributes"]
    r = project.run("fetch", "--models", "gshards")
    assert r.returncode == 0, r.stderr
    for name, data in shard_files().items():
        assert (project.store / "gshards" / "current" / name).read_bytes() == data
    assert not any((project.store / ".staging" / "gshards").glob("*.partial"))


HF_SHARDS_ALL = 'source = "hf://test/shards"\nrevision = "main"'


def test_https_single_file_with_sha256(project: Project, hub: Hub) -> None:
    name = "model-00001-of-00004.safetensors"
    data = shard_files()[name]
    url = f"{hub.endpoint}/test/shards/resolve/{hub.commits['test/shards']}/{name}"
    project.write_manifest(manifest(single=f'source = "{url}"\nsha256 = "{sha(data)}"'))
    assert project.run("lock", "--models", "single").returncode == 0
    assert lock_of(project)["models"]["single"]["files"] == [{"path": name, "size": len(data), "sha256": sha(data)}]
    assert project.run("fetch", "--models", "single").returncode == 0
    assert (project.store / "single" / "current" / name).read_bytes() == data


def test_https_wrong_sha256_activates_nothing(project: Project, hub: Hub) -> None:
    url = f"{hub.endpoint}/test/shards/resolve/{hub.commits['test/shards']}/config.json"
    project.write_manifest(manifest(single=f'source = "{url}"\nsha256 = "{"0" * 64}"'))
    project.run("lock", "--models", "single")
    r = project.run("fetch", "--models", "single")
    assert r.returncode == 1
    assert "models.lock pins " + "0" * 64 in r.stdout
    assert not (project.store / "single").exists()


def test_token_reaches_the_hub_but_never_the_output(project: Project, hub: Hub) -> None:
    proxy = Proxy(hub.endpoint).start()
    try:
        env = project.env(HF_ENDPOINT=proxy.url, HF_TOKEN=TOKEN)
        runs = [project.run(*args, env=env) for args in (["lock", "--models", "demo"], ["fetch", "--models", "demo"], ["verify", "--models", "demo", "--full"])]
        dead = project.env(HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN=TOKEN)
        runs.append(project.run("fetch", "--models", "shards", env=dead))
        runs.append(project.run("lock", "--models", "shards", env=dead))
    finally:
        proxy.stop()
    assert any(r.authorization == f"Bearer {TOKEN}" for r in proxy.requests)
    for r in runs:
        assert TOKEN not in r.stdout + r.stderr
    assert TOKEN not in (project.dir / "models.lock").read_text()
    assert not any(TOKEN.encode() in p.read_bytes() for p in project.store.rglob("*") if p.is_file())


def test_fetch_share_offers_each_file_as_a_link_to_its_verified_bytes(project: Project, hub: Hub) -> None:
    """`fetch --share` (a peer fan-out host): each file, once its bytes matched the lock, is a hard link under `<commit>.ready/`."""
    assert project.run("lock", "--models", "shards").returncode == 0
    r = project.run("fetch", "--models", "shards", "--share")
    assert r.returncode == 0, r.stderr
    commit = hub.commits["test/shards"]
    ready = project.store / ".staging" / "shards" / f"{commit}.ready"
    files = {f["path"] for f in lock_of(project)["models"]["shards"]["files"]}
    assert {p.name for p in ready.iterdir()} == files
    for name in files:
        assert (ready / name).stat().st_ino == (project.store / "shards" / commit / name).stat().st_ino  # the same bytes, no copy
    (project.store / "shards" / "current").unlink()
    again = project.run("fetch", "--models", "shards")  # a later fetch clears what an earlier one offered
    assert again.returncode == 0, again.stderr
    assert not ready.exists()
