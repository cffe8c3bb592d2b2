"""`invoke demo`: the whole path offline, on the bundled demo model.

A local hub (olah) serves demo/demo-tiny; then lock, fetch, full verify, a
re-fetch with the hub stopped (which must need no network at all), and the app
serving the verified model, answering one completion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ops.localhub import LocalHub
from ops.models.actions import fetch, lock_models, verify_models
from ops.models.lock import load_lock
from ops.models.report import Report
from ops.net import free_port
from ops.runner import stop

ROOT = Path(__file__).resolve().parent.parent
DEMO_FILES = ROOT / "demo" / "demo-tiny"
DEMO_REPO = "bakehouse/demo-tiny"


@contextmanager
def hub_env(endpoint: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_DISABLE_XET")}
    os.environ.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def run_demo(workdir: Path, say: Callable[[str], None] = print) -> int:
    """Run each step, print its report; return the first non-zero exit code, else 0."""
    shutil.rmtree(workdir, ignore_errors=True)
    store, manifest, lock = workdir / "models", ROOT / "models.toml", ROOT / "models.lock"
    hub = LocalHub(workdir / "hub")
    hub.add_repo(DEMO_REPO, {p.name: p for p in DEMO_FILES.iterdir()})
    with hub, hub_env(hub.endpoint):
        say(f"== local hub serving {DEMO_REPO} at {hub.endpoint}")
        relocked = workdir / "models.lock"
        steps: list[tuple[str, Callable[[], Report]]] = [
            ("lock (into .demo/models.lock, compared with the committed one)", lambda: lock_models(manifest_path=manifest, lock_path=relocked, names=["demo"])),
            ("fetch: download, full verify, activate", lambda: fetch(manifest_path=manifest, lock_path=lock, dest=store, names=["demo"])),
            ("verify --full", lambda: verify_models(manifest_path=manifest, lock_path=lock, dest=store, names=["demo"], full=True)),
        ]
        for title, step in steps:
            code = _step(title, step, say)
            if code:
                return code
        same = load_lock(relocked).models["demo"] == load_lock(lock).models["demo"]
        say(f"   committed models.lock {'matches' if same else 'DIFFERS FROM'} a fresh lock of the hub")
    say("== hub stopped")
    for title, step in [
        ("fetch again: already verified, zero network requests", lambda: fetch(manifest_path=manifest, lock_path=lock, dest=store, names=["demo"])),
        ("verify (quick: stamp only)", lambda: verify_models(manifest_path=manifest, lock_path=lock, dest=store, names=["demo"], full=False)),
    ]:
        code = _step(title, step, say)
        if code:
            return code
    say(f"== demo model verified and active at {store / 'demo' / 'current'}")
    return serve_and_complete(store, lock, workdir / "server.log", say)


def serve_and_complete(store: Path, lock: Path, log: Path, say: Callable[[str], None], prompt: str = "The weights are") -> int:
    """Start the app on the verified store (hub offline), wait for /ready, print one completion."""
    port = free_port()
    env = {**os.environ, "MODELS_DIR": str(store), "BAKEHOUSE_LOCK": str(lock), "MODEL": "demo", "HF_HUB_OFFLINE": "1", "HOST": "127.0.0.1", "PORT": str(port)}
    say(f"== serving demo at http://127.0.0.1:{port} (python -m app.entrypoint; log in {log})")
    start = time.monotonic()
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "app.entrypoint"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        if not _wait_ready(url, server, timeout=120):
            say(f"   the app did not become ready; see {log}")
            return 1
        say(f"   /ready after {time.monotonic() - start:.1f}s")
        body = {"model": "demo", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        text = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        say(f"== POST /v1/completions {json.dumps(body)}")
        say(f"   {prompt}{text}")
        return 0
    finally:
        stop(server)


def _wait_ready(url: str, server: subprocess.Popen, *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False


def _step(title: str, step: Callable[[], Report], say: Callable[[str], None]) -> int:
    say(f"== {title}")
    start = time.monotonic()
    report = step()
    say("   " + report.render().replace("\n", "\n   ") + f"   [{(time.monotonic() - start) * 1000:.0f} ms]")
    return report.exit_code
