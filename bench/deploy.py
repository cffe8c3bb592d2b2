"""Deploy wall time on 1 and 3 bare hosts (serial 1 vs serial 3), and each host's unavailability during a deploy.

    .venv/bin/python bench/deploy.py [--model demo|1g] [--rounds 2]

Hosts are sshd containers with their own filesystems (tests/sshhosts.py), the
app run by the fallback supervisor. Every measured deploy ships a new release
(a new version of this project's wheel; the dependencies are installed once,
in a warm-up deploy that is timed too). Unavailability is measured two ways:
the deploy's own `down` column (stop of the old app to /ready of the new) and
a poller hitting each host's /ready every 50 ms from outside (the longest run
of non-200 answers). Writes bench/results/deploy.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import threading
import time

import httpx

from bench.common import DEMO, ROOT, machine, markdown_table, random_lm, save_results
from ops.localhub import LocalHub
from ops.net import free_port
from testbed.helpers import Project
from testbed.sshhosts import client_keys, ensure_host_image, start_host

WORK = ROOT / "bench" / "work" / "deploy"
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


class Poller:
    """GET /ready every 50 ms; the longest stretch without a 200 is the unavailability seen by a client."""

    def __init__(self, port: int):
        self.port, self.longest, self._stop = port, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        down_since = None
        with httpx.Client(timeout=1) as client:
            while not self._stop.is_set():
                try:
                    up = client.get(f"http://127.0.0.1:{self.port}/ready").status_code == 200
                except httpx.TransportError:
                    up = False
                now = time.monotonic()
                if up and down_since is not None:
                    self.longest, down_since = max(self.longest, now - down_since), None
                elif not up and down_since is None:
                    down_since = now
                time.sleep(0.05)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["demo", "1g"], default="demo")
    ap.add_argument("--rounds", type=int, default=2, help="measurements per configuration (the median is reported)")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    ensure_host_image()
    keys = client_keys(WORK / f"keys-{time.time_ns()}")
    hosts = [start_host(f"d{i}", keys) for i in (1, 2, 3)]
    ports = {h.name: free_port() for h in hosts}
    weights = DEMO if args.model == "demo" else random_lm("1g")
    results: list[dict] = []
    try:
        with LocalHub(WORK / f"hub-{time.time_ns()}") as hub:
            hub.add_repo("bench/model", {p.name: p for p in weights.iterdir() if p.is_file()})
            project = Project(WORK / f"project-{time.time_ns()}", hub.endpoint)
            project.dir.mkdir(parents=True)
            project.write_manifest('default = ["bench"]\n\n[models.bench]\nsource = "hf://bench/model"\nrevision = "main"\n')
            subprocess.run([sys.executable, "-m", "ops.models", "lock"], cwd=project.dir, env=project.env(), check=True, capture_output=True)
            lines = ["all:", "  vars:", f"    ansible_ssh_private_key_file: {keys / 'id'}", "    runtime: bare", "    process_manager: supervise",
                     "    ready_timeout: 600", "  hosts:"]
            for h in hosts:
                lines += [f"    {h.name}:", "      ansible_host: 127.0.0.1", f"      ansible_port: {h.port}", f"      port: {ports[h.name]}"]
            (project.dir / "hosts.yml").write_text("\n".join(lines) + "\n")
            version = iter(range(1, 1000))

            def deploy(names: list[str], serial: int) -> dict:
                tag = f"r{next(version)}"
                with contextlib.ExitStack() as stack:
                    pollers = [stack.enter_context(Poller(ports[n])) for n in names]
                    start = time.monotonic()
                    r = subprocess.run([*INVOKE, "deploy", "--inventory", "hosts.yml", "--known-hosts", str(keys / "known_hosts"), "--hosts", ",".join(names),
                                        "--tag", tag, "--serial", str(serial)], cwd=project.dir, env=project.env(), capture_output=True, text=True, check=False)
                    wall = time.monotonic() - start
                if r.returncode != 0:
                    raise SystemExit(r.stdout + r.stderr[-3000:])
                down = [float(m) for m in re.findall(r"deployed\s+\S+s\s+([\d.]+)s", r.stdout)]
                return {"wall_s": wall, "down_s": down, "outside_down_s": [p.longest for p in pollers]}

            names = [h.name for h in hosts]
            first = deploy(names, 3)
            results.append({"config": "first deploy, 3 hosts, serial 3 (installs the dependencies)", **first})
            print(f"first deploy: {first['wall_s']:.1f}s", flush=True)
            for label, subset, serial in (("1 host", names[:1], 1), ("3 hosts, serial 1", names, 1), ("3 hosts, serial 3", names, 3)):
                runs = [deploy(subset, serial) for _ in range(args.rounds)]
                results.append({"config": label, "wall_s": statistics.median(r["wall_s"] for r in runs),
                                "down_s": [statistics.median(r["down_s"][i] for r in runs) for i in range(len(subset))],
                                "outside_down_s": [statistics.median(r["outside_down_s"][i] for r in runs) for i in range(len(subset))], "runs": runs})
                print(f"{label}: {results[-1]['wall_s']:.1f}s", flush=True)
    finally:
        for h in hosts:
            h.stop()
    write(results, args.model, args.rounds)


def write(results: list[dict], model: str, rounds: int) -> None:
    m = machine()
    one = next(r["wall_s"] for r in results if r["config"] == "1 host")
    md = [
        f"# Deploy: a new release onto bare hosts over SSH ({model} model)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM; every host is an sshd container on this same machine; {m['date']}.",
        f"Each measured deploy ships a new release of this project (median of {rounds}); the app is started by the fallback supervisor.",
        "`down`: stop of the old app to /ready of the new, as the deploy reports it (polled over SSH every 0.25 s); `seen from outside`: longest run of non-200",
        "/ready answers from a client polling every 50 ms. The first deploy has no old app, so its `down` is the new app's start to ready.",
        "",
        *markdown_table(["deploy", "wall time", "vs 1 host", "down per host", "seen from outside"],
                        [[r["config"], f"{r['wall_s']:.1f} s", f"{r['wall_s'] / one:.2f}x",
                          ", ".join(f"{d:.1f} s" for d in r["down_s"]),
                          "-" if r["config"].startswith("first") else ", ".join(f"{d:.1f} s" for d in r["outside_down_s"])] for r in results]),
    ]
    save_results(f"deploy-{model}" if model != "demo" else "deploy", md, {"machine": m, "model": model, "results": results})


if __name__ == "__main__":
    main()
