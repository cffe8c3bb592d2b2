"""Rollouts under load: what 16 clients sending completions to a host's public port see during a deploy, for each strategy.

    .venv/bin/python -m bench.deploy [--clients 16] [--baseline-seconds 20]

One bare host (an sshd container, the app under the fallback supervisor, the
front proxy on its public port). Per strategy (blue-green, hold): the same
load with no deploy first (the baseline), then a deploy of a new release under
that load. Reported: requests sent and failed, the time the proxy held
requests (hold), and p50/p99/max latency of the requests that started during
the deploy against the baseline's. Writes bench/results/deploy.{json,md}.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

from bench.common import DEMO, ROOT, cpu_line, machine, markdown_table, save_results
from ops.localhub import LocalHub
from ops.net import free_port
from testbed.helpers import Project
from testbed.load import Load, LoadReport
from testbed.sshhosts import client_keys, ensure_host_image, start_host

WORK = ROOT / "bench" / "work" / "deploy"
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


def percentiles(values: list[float]) -> dict[str, float]:
    v = sorted(values) or [0.0]
    return {"p50_s": statistics.median(v), "p99_s": v[min(len(v) - 1, int(0.99 * len(v)))], "max_s": v[-1], "n": len(v)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--baseline-seconds", type=float, default=20.0)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    ensure_host_image()
    keys = client_keys(WORK / f"keys-{time.time_ns()}")
    host = start_host("bench", keys)
    port, a, b = free_port(), free_port(), free_port()
    results = []
    try:
        with LocalHub(WORK / f"hub-{time.time_ns()}") as hub:
            hub.add_repo("bench/model", {p.name: p for p in DEMO.iterdir() if p.is_file()})
            project = Project(WORK / f"project-{time.time_ns()}", hub.endpoint)
            project.dir.mkdir(parents=True)
            project.write_manifest('default = ["demo"]\n\n[models.demo]\nsource = "hf://bench/model"\nrevision = "main"\n')
            subprocess.run([sys.executable, "-m", "ops.models", "lock"], cwd=project.dir, env=project.env(), check=True, capture_output=True)
            versions = iter(range(1, 1000))

            def deploy(rollout: str) -> subprocess.CompletedProcess[str]:
                (project.dir / "hosts.yml").write_text("\n".join([
                    "all:", "  hosts:", "    bench:", "      ansible_host: 127.0.0.1", f"      ansible_port: {host.port}",
                    f"      ansible_ssh_private_key_file: {keys / 'id'}", "      runtime: bare", "      process_manager: supervise", f"      port: {port}",
                    f"      instance_ports: [{a}, {b}]", f"      rollout: {rollout}", "      ready_timeout: 600", ""]))
                r = subprocess.run([*INVOKE, "deploy", "--inventory", "hosts.yml", "--known-hosts", str(keys / "known_hosts"), "--hosts", "bench",
                                    "--tag", f"r{next(versions)}"], cwd=project.dir, env=project.env(), capture_output=True, text=True, check=False)
                if r.returncode != 0:
                    raise SystemExit(r.stdout + r.stderr[-3000:])
                return r

            deploy("blue-green")  # the first release: dependencies installed, the proxy started
            for rollout in ("blue-green", "hold"):
                load = Load(f"http://127.0.0.1:{port}", clients=args.clients).start()
                time.sleep(args.baseline_seconds)
                split = time.monotonic()
                r = deploy(rollout)
                ended = time.monotonic()
                time.sleep(2)
                report = load.stop()
                results.append(measure(rollout, report, split, ended, r.stdout))
                print(results[-1], flush=True)
    finally:
        host.stop()
    write(results, args.clients)


def measure(rollout: str, report: LoadReport, split: float, ended: float, table: str) -> dict:
    row = next(line.split() for line in table.splitlines() if line.startswith("bench "))
    held, drained = (None if v == "-" else float(v.rstrip("s")) for v in row[-2:])
    return {"rollout": rollout, "sent": report.sent, "answered": len(report.answers), "failed": len(report.bad()), "deploy_s": ended - split,
            "held_s": held, "drained_s": drained, "baseline": percentiles(report.latencies(end=split)),
            "during_deploy": percentiles(report.latencies(start=split, end=ended)), "table": re.sub(r"\s+", " ", " ".join(row))}


def write(results: list[dict], clients: int) -> None:
    m = machine()
    rows = [[r["rollout"], str(r["sent"]), str(r["failed"]), "-" if r["held_s"] is None else f"{r['held_s']:.1f} s", f"{r['drained_s']:.1f} s",
             f"{r['baseline']['p50_s']:.2f} / {r['baseline']['p99_s']:.2f} s", f"{r['during_deploy']['p50_s']:.2f} / {r['during_deploy']['p99_s']:.2f} s",
             f"{r['during_deploy']['p99_s'] - r['baseline']['p99_s']:+.2f} s", f"{r['during_deploy']['max_s']:.2f} s"] for r in results]
    md = [
        f"# Rollouts under load: {clients} clients on one bare host's public port",
        "",
        f"Machine: {cpu_line(m)}; the host is an sshd container on this machine (the app and the clients share its cores); commit {m['commit']}, {m['date']}.",
        "Each client sends greedy completions of 12 tokens back to back, streamed and whole in turn, through the front proxy. The baseline is the same",
        "load before the deploy; `during` covers the requests that started while the deploy ran. `held`: how long the proxy held new requests",
        "(hold only); `drained`: the old instance's drain and stop. Generated from deploy.json by bench/deploy.py.",
        "",
        *markdown_table(["rollout", "requests", "failed", "held", "drained", "p50 / p99 baseline", "p50 / p99 during", "p99 added", "max during"], rows),
    ]
    save_results("deploy", md, {"machine": m, "clients": clients, "results": results})


if __name__ == "__main__":
    main()
