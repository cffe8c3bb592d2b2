"""Real containers for the image tests: podman and a Docker engine, a registry with htpasswd auth, a source tree to build."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ops.net import free_port
from ops.runner import stop
from testbed.helpers import ROOT

BASE_IMAGE = "localhost/bakehouse-base:bookworm"


def ensure_base_image() -> str:
    subprocess.run([str(ROOT / "scripts" / "make-base-image.sh"), BASE_IMAGE], check=True)
    return BASE_IMAGE


def source_tree(dest: Path) -> Path:
    """The tracked files of this checkout, as a user's clone would have them."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=timeout)


# Debian's docker CLI (20.10, the daemon's own version) builds with BuildKit; a newer CLI in /usr/local/bin may lack buildx.
DOCKER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/bin"


@dataclass
class Engine:
    """One container engine as the tests drive it: its CLI and the environment that reaches its daemon."""

    name: str
    env: dict[str, str]

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.name, *args], env={**os.environ, **self.env}, capture_output=True, text=True, check=check, timeout=timeout)

    def layers(self, image: str) -> list[str]:
        return json.loads(self.cli("image", "inspect", "--format", "{{json .RootFS.Layers}}", image).stdout)

    def exists(self, container: str) -> bool:
        return self.cli("container", "inspect", container, check=False).returncode == 0

    def save(self, image: str, archive: Path) -> None:
        self.cli("save", *(["--format", "docker-archive"] if self.name == "podman" else []), "-o", str(archive), image)

    def logs(self, container: str) -> str:
        out = self.cli("logs", container, check=False)
        return out.stdout + out.stderr


PODMAN = Engine("podman", {})


@dataclass
class DockerDaemon:
    """A dockerd of the tests' own (own socket, data root and exec root), or the one already answering."""

    engine: Engine
    process: subprocess.Popen | None

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=30)


def start_docker(root: Path) -> DockerDaemon:
    env = {"PATH": DOCKER_PATH}
    if shutil.which("dockerd") is None:
        raise RuntimeError("dockerd is not installed: scripts/setup.sh installs docker.io")
    answering = subprocess.run(["docker", "info"], env={**os.environ, **env}, capture_output=True, check=False)
    if answering.returncode == 0 and not os.environ.get("BAKEHOUSE_TEST_OWN_DOCKERD"):
        return DockerDaemon(Engine("docker", {**env, **({"DOCKER_HOST": os.environ["DOCKER_HOST"]} if "DOCKER_HOST" in os.environ else {})}), None)
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "docker.sock"
    log = open(root / "dockerd.log", "w")  # noqa: SIM115 (the daemon keeps writing to it)
    proc = subprocess.Popen(["dockerd", "--host", f"unix://{sock}", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
                             "--pidfile", str(root / "dockerd.pid"), "--bridge", "none", "--iptables=false"], stdout=log, stderr=subprocess.STDOUT)
    engine = Engine("docker", {**env, "DOCKER_HOST": f"unix://{sock}"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if engine.cli("info", check=False).returncode == 0:
            return DockerDaemon(engine, proc)
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    stop(proc)
    raise RuntimeError(f"dockerd did not start; see {root / 'dockerd.log'}:\n{(root / 'dockerd.log').read_text()[-2000:]}")


def load_image(engine: Engine, image: str) -> None:
    """Make a podman image (the local debootstrap base) available to the engine: no registry is needed."""
    if engine.name == "podman" or engine.cli("image", "inspect", image, check=False).returncode == 0:
        return
    archive = subprocess.Popen(["podman", "save", "--format", "docker-archive", image], stdout=subprocess.PIPE)
    subprocess.run([engine.name, "load"], stdin=archive.stdout, env={**os.environ, **engine.env}, check=True, capture_output=True)
    archive.wait()


def layers(image: str) -> list[str]:
    return PODMAN.layers(image)


PROBE = """
import sys, urllib.error, urllib.request
path, body = sys.argv[1], sys.argv[2]
req = urllib.request.Request("http://127.0.0.1:8000" + path, data=body.encode() or None, headers={"content-type": "application/json"})
try:
    r = urllib.request.urlopen(req, timeout=60)
    print(r.status)
    print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code)
    print(e.read().decode())
"""


def exec_json(container: str, path: str, body: dict | None = None, engine: Engine = PODMAN) -> tuple[int, dict]:
    """HTTP from inside the container (it may have no network at all); (0, {}) while nothing listens."""
    out = engine.cli("exec", container, "python", "-c", PROBE, path, json.dumps(body) if body else "", check=False)
    if out.returncode != 0:
        return 0, {}
    status, _, text = out.stdout.partition("\n")
    return int(status), json.loads(text)


def wait_ready_inside(container: str, timeout: float = 180, engine: Engine = PODMAN) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exec_json(container, "/ready", engine=engine)[0] == 200:
            return
        state = engine.cli("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
        if state in ("exited", "stopped", "dead"):
            raise AssertionError(f"container {container} exited:\n{engine.logs(container)}")
        time.sleep(0.5)
    raise AssertionError(f"{container} never became ready:\n{engine.logs(container)}")


@dataclass
class RegistryServer:
    process: subprocess.Popen
    root: Path
    host: str
    user: str
    password: str

    def stop(self) -> None:
        stop(self.process)


def start_registry(root: Path, user: str, password: str) -> RegistryServer:
    port = free_port()
    (root / "data").mkdir(parents=True)
    htpasswd = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True).stdout
    (root / "htpasswd").write_text(htpasswd)
    (root / "config.yml").write_text(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: " + str(root / "data") + "\n"
        "http:\n  addr: 127.0.0.1:" + str(port) + "\nauth:\n  htpasswd:\n    realm: bakehouse\n    path: " + str(root / "htpasswd") + "\n"
    )
    with open(root / "registry.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 401:
                return RegistryServer(proc, root, f"127.0.0.1:{port}", user, password)
        except httpx.TransportError:
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"registry did not start; see {root / 'registry.log'}")


def blob_uploads(reg: RegistryServer) -> int:
    """Blob uploads completed, as the registry itself logged them."""
    log = (reg.root / "registry.log").read_text()
    return len(re.findall(r'msg="response completed".*http\.request\.method=PUT .*/blobs/uploads/[^"]*digest=.*http\.response\.status=201', log))
