"""What one controller costs per host: a quick verify of a tiny model on 10, 50, 100 and 200 simulated hosts.

    .venv/bin/python bench/fleet_controller.py [--hosts 10,50,100,200] [--parallel 8,32]

The hosts are sshds on loopback ports inside a few containers (tests/fleetsim.py),
already bootstrapped and holding the model. For each run: wall time, the
controller's CPU seconds per host (user + system of the invoke process and
its children on this machine, from wait4), its peak RSS (VmHWM from /proc:
wait4's maxrss counts the image of this benchmark process, which the child
was forked from), and the most SSH connections it held at once (sampled from
/proc). The hosts' own work (their
`python -m ops.models verify`) runs in the containers, on the same 2 cores,
so wall time here includes it; the controller's figures do not.
Writes bench/results/fleet-controller.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import ROOT, machine, markdown_table, save_results
from ops.localhub import LocalHub
from testbed.fleetsim import start_fleet
from testbed.helpers import DEMO, Project
from testbed.sshhosts import client_keys

WORK = ROOT / "bench" / "work" / "fleet-controller"
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


def connections(pid: int) -> int:
    """Established TCP connections of the process (its sockets, counted in /proc/net/tcp by inode)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return 0
    inodes = {i for i in inodes if i.isdigit()}
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            count += sum(1 for line in f if line.split()[3] == "01" and line.split()[9] in inodes)
    return count


def peak_rss_kb(pid: int) -> int:
    """The process's resident-memory high-water mark since its exec (VmHWM), in KB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def measure(project: Project, keys: Path, inventory: Path, parallel: int) -> dict[str, float]:
    argv = [*INVOKE, "verify-models", "--inventory", str(inventory), "--known-hosts", str(keys / "known_hosts"), "--group", "sim", "--models", "demo",
            "--parallel", str(parallel), "--json"]
    peak, rss = [0], [0]
    start = time.monotonic()
    out_file = project.dir / f"verify-{parallel}.json"
    with out_file.open("w") as out:  # a file, not a pipe: 200 hosts' JSON is more than a pipe holds before anyone reads it
        proc = subprocess.Popen(argv, cwd=project.dir, env=project.env(), stdout=out, stderr=subprocess.DEVNULL)

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], connections(proc.pid))
            rss[0] = max(rss[0], peak_rss_kb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    sampler.join()
    out = out_file.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, out[-2000:]
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": rss[0] / 1024, "connections": peak[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="10,50,100,200")
    ap.add_argument("--parallel", default="8,32")
    args = ap.parse_args()
    counts, parallels = [int(n) for n in args.hosts.split(",")], [int(p) for p in args.parallel.split(",")]
    WORK.mkdir(parents=True, exist_ok=True)
    keys = client_keys(WORK / f"keys-{os.getpid()}")
    fleet = start_fleet(max(counts), keys)
    results: dict[str, dict[str, float]] = {}
    try:
        with LocalHub(WORK / f"hub-{os.getpid()}") as hub:
            hub.add_repo("bakehouse/demo-tiny", {p.name: p for p in DEMO.iterdir()})
            project = Project(WORK / f"project-{os.getpid()}", hub.endpoint)
            project.dir.mkdir()
            (project.dir / "models.toml").write_text('[models.demo]\nsource = "hf://bakehouse/demo-tiny"\nrevision = "main"\n')
            assert project.run("lock", "--models", "demo").returncode == 0
            fleet.inventory(project.dir / "all.yml", keys)
            fetch = [*INVOKE, "fetch-models", "--inventory", "all.yml", "--known-hosts", str(keys / "known_hosts"), "--group", "sim", "--models", "demo", "--parallel", "16"]
            for attempt in range(3):  # setup, not measured: a host that timed out while 200 venvs were being made converges on a re-run
                r = subprocess.run(fetch, cwd=project.dir, env=project.env(), capture_output=True, text=True)
                if r.returncode == 0:
                    break
                print(f"setup fetch, attempt {attempt + 1}: exit {r.returncode}\n" + "\n".join(r.stdout.splitlines()[-5:]), flush=True)
            else:
                raise SystemExit("the setup fetch did not converge")
            for n in counts:
                sub = type(fleet)(fleet.hosts[:n], fleet.containers)
                inventory = sub.inventory(project.dir / f"hosts-{n}.yml", keys)
                for p in parallels:
                    r = measure(project, keys, inventory, p)
                    results[f"{n}-{p}"] = {"hosts": n, "parallel": p, **r}
                    print(f"{n} hosts, parallel {p}: {r['wall_s']:.1f}s, {1000 * r['cpu_s'] / n:.1f} ms CPU/host, {r['rss_mb']:.0f} MB, {r['connections']} connections",
                          flush=True)
    finally:
        fleet.stop()
    write(results)


def write(results: dict[str, dict[str, float]]) -> None:
    m = machine()
    rows = [[str(int(r["hosts"])), str(int(r["parallel"])), f"{r['wall_s']:.1f} s", f"{1000 * r['cpu_s'] / r['hosts']:.1f} ms", f"{r['rss_mb']:.0f} MB",
             f"{r['rss_mb'] / r['hosts']:.2f} MB", str(int(r["connections"]))] for r in results.values()]
    projection = project(list(results.values()))
    md = ["# Controller cost: quick verify of a tiny model on simulated hosts", "",
          f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM; hosts are sshds in containers on the same machine; {m['date']}.", "",
          *markdown_table(["hosts", "parallel", "wall time", "controller CPU per host", "peak RSS", "RSS per host", "peak SSH connections"], rows), "",
          f"Projected to {PROJECT_TO:,} hosts (at the largest parallel measured, CPU per host and RSS growth per host from the two largest runs): "
          f"{projection['cpu_s']:.0f} s of controller CPU ({projection['cpu_s'] / 8:.0f} s on 8 cores), peak RSS about {projection['rss_mb']:.0f} MB."]
    save_results("fleet-controller", md, {"machine": m, "results": results, "projection": projection})


PROJECT_TO = 10_000


def project(rows: list[dict[str, float]]) -> dict[str, float]:
    """Controller CPU and peak RSS at PROJECT_TO hosts: CPU per host of the largest run; RSS's growth per host between the two largest runs."""
    top = max(r["parallel"] for r in rows)
    runs = sorted((r for r in rows if r["parallel"] == top), key=lambda r: r["hosts"])
    small, large = runs[-2], runs[-1]
    per_host_rss = max(0.0, (large["rss_mb"] - small["rss_mb"]) / (large["hosts"] - small["hosts"]))
    return {"hosts": PROJECT_TO, "parallel": top, "cpu_s": large["cpu_s"] / large["hosts"] * PROJECT_TO,
            "rss_mb": large["rss_mb"] + per_host_rss * (PROJECT_TO - large["hosts"])}


if __name__ == "__main__":
    main()
