"""Start `python -m app.entrypoint` as a real process on loopback and wait for it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ops.net import free_port
from ops.runner import stop
from testbed.helpers import ROOT, Project


@dataclass
class AppServer:
    process: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def wait(self, path: str = "/ready", status: int = 200, timeout: float = 120) -> httpx.Response:
        deadline = time.monotonic() + timeout
        last: httpx.Response | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                last = self.get(path)
                if last.status_code == status:
                    return last
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{path} never answered {status} (last: {last and last.text}):\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        stop(self.process)


def serve_store(project: Project, log: Path, **env: str) -> AppServer:
    """The app on `project`'s lock and store, offline, once it answers /ready."""
    s = start_app(project.env(BAKEHOUSE_LOCK=str(project.dir / "models.lock"), HF_HUB_OFFLINE="1", **env), log)
    s.wait()
    return s


def start_app(env: dict[str, str], log: Path, *, compile_kernels: bool = False, **extra: str) -> AppServer:
    """`compile_kernels`: the background kernel compile after ready (app.tuning), off unless a test or benchmark is about it: each start would
    spend seconds of this machine's two cores on it while other tests run."""
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "BAKEHOUSE_", "MODEL", "GIT_"))}
    full = {**inherited, "BAKEHOUSE_COMPILE": str(int(compile_kernels)), **env, **extra, "PORT": str(port), "HOST": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "app.entrypoint"], env=full, stdout=fh, stderr=subprocess.STDOUT, text=True)
    return AppServer(proc, port, log)
