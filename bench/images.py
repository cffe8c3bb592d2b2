"""The second seed's comparison table, measured: baked vs unbaked images.

    .venv/bin/python bench/images.py [--model 1g|tiny] [--engine podman|docker]

Builds this checkout with podman or a Docker engine (BuildKit; a dockerd of
the benchmark's own) from the local base image, the model served by the local
hub (olah): cold baked build, cold unbaked build, rebuild after a code-only
change, image sizes, and container start to /ready for a baked image, an
unbaked image fetching at start, and an unbaked image with the store mounted
read-only. Writes bench/results/images[-docker].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import RESULTS, ROOT, machine, markdown_table, random_lm, save_results
from ops.localhub import LocalHub
from ops.net import free_port
from ops.units import format_bytes
from testbed.containers import BASE_IMAGE, PODMAN, DockerDaemon, Engine, ensure_base_image, load_image, podman, source_tree, start_docker

WORK = ROOT / "bench" / "work" / "images"
ENGINE: Engine = PODMAN
DAEMON: DockerDaemon | None = None


def build(src: Path, env: dict[str, str], tag: str, *flags: str) -> float:
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "invoke", "build", "--engine", ENGINE.name, "--ca-bundle", "/etc/ssl/certs/ca-certificates.crt", "--tag", tag, *flags],
                       cwd=src, env={**env, **ENGINE.env}, capture_output=True, text=True)
    (WORK / f"build-{tag.split(':')[-1]}-{len(flags)}.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(r.stdout + r.stderr[-3000:])
    elapsed = time.monotonic() - start
    cache = next((line for line in r.stdout.splitlines() if line.startswith("model layer")), "")
    print(f"{elapsed:7.1f}s  build {tag} {' '.join(flags)}  {cache}", flush=True)
    return elapsed


def start_to_ready(image: str, *args: str) -> float:
    port = free_port()
    name = f"bench-{port}"
    start = time.monotonic()
    ENGINE.cli("run", "-d", "--name", name, "--network", "host", "-e", f"PORT={port}", *args, image)
    try:
        while time.monotonic() - start < 900:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    elapsed = time.monotonic() - start
                    print(f"{elapsed:7.1f}s  ready {image} {' '.join(args)}", flush=True)
                    return elapsed
            except httpx.TransportError:
                pass
            if ENGINE.cli("inspect", "--format", "{{.State.Status}}", name).stdout.strip() == "exited":
                raise SystemExit(ENGINE.logs(name))
            time.sleep(0.1)
        raise SystemExit(f"{image} never became ready")
    finally:
        ENGINE.cli("rm", "-f", name, check=False)


def size(image: str) -> int:
    return int(ENGINE.cli("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["1g", "tiny"], default="1g")
    ap.add_argument("--engine", choices=["podman", "docker"], default="podman")
    args = ap.parse_args()
    if args.engine == "docker":
        global ENGINE
        ENGINE = Engine("docker", {})
    try:
        measure(args)
    finally:
        if DAEMON is not None:
            DAEMON.stop()


def measure(args: argparse.Namespace) -> None:
    ensure_base_image()
    WORK.mkdir(parents=True, exist_ok=True)
    weights = random_lm(args.model)
    model_bytes = sum(p.stat().st_size for p in weights.iterdir())
    shutil.rmtree(WORK / "hub", ignore_errors=True)
    src = source_tree(Path(tempfile.mkdtemp(prefix="bench-src-", dir=WORK)))
    r: dict[str, float] = {"model_bytes": model_bytes}
    with LocalHub(WORK / "hub") as hub:
        hub.add_repo("bench/model", {p.name: p for p in weights.iterdir()})
        (src / "models.toml").write_text('default = ["bench"]\n[models.bench]\nsource = "hf://bench/model"\nrevision = "main"\nbake = true\n')
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "BAKEHOUSE_BASE_IMAGE": BASE_IMAGE, "PYTHONPATH": str(src)}
        subprocess.run([sys.executable, "-m", "ops.models", "lock"], cwd=src, env=env, check=True, capture_output=True)
        base_tar = WORK / "base.tar"
        if not base_tar.exists():
            podman("save", "-o", str(base_tar), BASE_IMAGE)
        r["build_unbaked_s"] = build_cold(src, env, "localhost/bench:unbaked", base_tar)
        r["size_unbaked"] = size("localhost/bench:unbaked")
        unbaked_tar = WORK / "unbaked.tar"
        unbaked_tar.unlink(missing_ok=True)
        ENGINE.save("localhost/bench:unbaked", unbaked_tar)
        r["build_baked_s"] = build_cold(src, env, "localhost/bench:baked", base_tar, "--bake")
        with open(src / "app" / "__init__.py", "a") as f:
            f.write("# a code-only change\n")
        if ENGINE.name == "podman":
            env["CONTAINERS_STORAGE_CONF"] = os.environ["CONTAINERS_STORAGE_CONF"]
        r["rebuild_baked_s"] = build(src, env, "localhost/bench:baked", "--bake")
        r["size_baked"] = size("localhost/bench:baked")
        ENGINE.cli("load", "-i", str(unbaked_tar))
        r["ready_baked_s"] = start_to_ready("localhost/bench:baked", "-e", "HF_HUB_OFFLINE=1", "-e", "MODEL=bench")
        r["ready_fetch_s"] = start_to_ready("localhost/bench:unbaked", "-e", f"HF_ENDPOINT={hub.endpoint}", "-e", "HF_HUB_DISABLE_XET=1", "-e", "MODEL=bench")
        store = WORK / "store"
        shutil.rmtree(store, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "ops.models", "fetch", "--dest", str(store)], cwd=src, env=env, check=True, capture_output=True)
    r["ready_mount_s"] = start_to_ready("localhost/bench:unbaked", "-v", f"{store}:/models:ro", "-e", "MODEL=bench", "-e", "HF_HUB_OFFLINE=1")
    write(r, args)


def fresh_storage(name: str, base_tar: Path) -> None:
    """An empty image store holding only the base image: a truly cold build (podman: a storage of its own; Docker: a dockerd of its own)."""
    global ENGINE, DAEMON
    if ENGINE.name == "docker":
        if DAEMON is not None:
            DAEMON.stop()
        root = Path(tempfile.mkdtemp(prefix=f"bh-dockerd-{name}-", dir="/tmp"))
        os.environ["BAKEHOUSE_TEST_OWN_DOCKERD"] = "1"
        DAEMON = start_docker(root)
        ENGINE = DAEMON.engine
        load_image(ENGINE, BASE_IMAGE)
        return
    root = WORK / f"storage-{name}"
    subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)
    conf = root / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "graph"}"\nrunroot = "{root / "run"}"\n')
    os.environ["CONTAINERS_STORAGE_CONF"] = str(conf)
    podman("load", "-i", str(base_tar))


def build_cold(src: Path, env: dict[str, str], tag: str, base_tar: Path, *flags: str) -> float:
    """A first build on a machine that has only the base image."""
    fresh_storage(tag.split(":")[-1], base_tar)
    extra = {"CONTAINERS_STORAGE_CONF": os.environ["CONTAINERS_STORAGE_CONF"]} if ENGINE.name == "podman" else {}
    return build(src, {**env, **extra}, tag, *flags)


def write(r: dict[str, float], args: argparse.Namespace, m: dict[str, str] | None = None) -> None:
    m = m or machine()
    rows = [
        ("build, unbaked (first build: only the base image present)", f"{r['build_unbaked_s']:.1f} s"),
        ("build, baked (first build: only the base image present)", f"{r['build_baked_s']:.1f} s"),
        ("rebuild, baked, after a code-only change", f"{r['rebuild_baked_s']:.1f} s ({100 * r['rebuild_baked_s'] / r['build_baked_s']:.0f}% of the first baked build)"),
        ("image size, unbaked", format_bytes(r["size_unbaked"])),
        ("image size, baked", format_bytes(r["size_baked"])),
        ("container start to /ready, baked (HF_HUB_OFFLINE=1)", f"{r['ready_baked_s']:.1f} s"),
        ("container start to /ready, unbaked, fetch at start", f"{r['ready_fetch_s']:.1f} s"),
        ("container start to /ready, unbaked, store mounted read-only", f"{r['ready_mount_s']:.1f} s"),
    ]
    engine = getattr(args, "engine", "podman")
    md = [
        f"# Images: baked vs unbaked, {format_bytes(r['model_bytes'])} model ({args.model}), {engine}, local hub (olah) on loopback",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM; torch {m['torch']} (CPU); {m['date']}.",
        "The local hub streams at about 27 MB/s here, which bounds the baked build and the fetch at start.",
        "",
        *markdown_table(["measure", "result"], [list(row) for row in rows]),
    ]
    save_results("images" if engine == "podman" else f"images-{engine}", md, {"machine": m, "results": r, "model": args.model, "engine": engine})


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:
        saved = json.loads((RESULTS / "images.json").read_text())
        write(saved["results"], argparse.Namespace(model=saved["model"]), saved["machine"])
    else:
        main()
