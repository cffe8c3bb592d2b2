"""Putting a model on 1, 2, 4 and 8 bare hosts: direct fetch vs fan-out vs one host after another.

    .venv/bin/python bench/fleet.py [--model 1g] [--hosts 1,2,4,8] [--modes direct,fanout,sequential]

Hosts are sshd containers with their own filesystems (tests/sshhosts.py); the
hub is the local olah behind a counting, caching proxy that plays the hub's CDN
(warmed once before measuring, so olah's ~27 MB/s does not bound the run);
"hub bytes" is what that CDN served to the hosts. Writes bench/results/fleet.{json,md} after every measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from common import RESULTS, machine, markdown_table, random_lm, save_results  # noqa: E402
from helpers import Project  # noqa: E402
from proxy import Proxy  # noqa: E402
from sshhosts import client_keys, ensure_host_image, inventory, start_host  # noqa: E402

from ops.localhub import LocalHub  # noqa: E402
from ops.units import format_bytes  # noqa: E402

WORK = ROOT / "bench" / "work" / "fleet"
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["1g", "tiny"], default="1g")
    ap.add_argument("--hosts", default="1,2,4,8")
    ap.add_argument("--modes", default="direct,fanout,sequential")
    ap.add_argument("--keep", action="store_true", help="keep earlier results for host counts not measured this run")
    ap.add_argument("--sequential-hosts", default="1,2,4", help="host counts measured one after another (each costs n single fetches)")
    args = ap.parse_args()
    counts = [int(n) for n in args.hosts.split(",")]
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    ensure_host_image()
    weights = random_lm(args.model)
    keys = client_keys(WORK / "keys")
    hosts = [start_host(f"h{i}", keys) for i in range(1, max(counts) + 1)]
    saved = RESULTS / "fleet.json"
    plan = {(n, mode) for n in counts for mode in args.modes.split(",") if mode != "sequential" or str(n) in args.sequential_hosts.split(",")}
    results: list[dict] = [r for r in json.loads(saved.read_text())["results"] if (r["hosts"], r["mode"]) not in plan] if args.keep and saved.exists() else []
    try:
        with LocalHub(WORK / "hub") as hub:
            hub.add_repo("bench/model", {p.name: p for p in weights.iterdir()})
            proxy = Proxy(hub.endpoint, cache_dir=WORK / "cdn").start()
            project = Project(WORK / "project", proxy.url)
            project.dir.mkdir()
            (project.dir / "models.toml").write_text('[models.bench]\nsource = "hf://bench/model"\nrevision = "main"\n')
            subprocess.run([sys.executable, "-m", "ops.models", "lock"], cwd=project.dir, env=project.env(), check=True, capture_output=True)
            subprocess.run([sys.executable, "-m", "ops.models", "fetch", "--dest", str(WORK / "warm")], cwd=project.dir, env=project.env(), check=True, capture_output=True)
            shutil.rmtree(WORK / "warm")
            inv = inventory(project.dir / "hosts.yml", keys, hosts)
            model_bytes = sum(p.stat().st_size for p in weights.iterdir())
            # Bootstrap every host first (a verify of the absent model fails, as expected), so runs time fetches only.
            subprocess.run([*INVOKE, "verify-models", "--inventory", str(inv), "--lock", str(project.dir / "models.lock"),
                            "--known-hosts", str(keys / "known_hosts"), "--hosts", ",".join(h.name for h in hosts)], env=project.env(), capture_output=True, check=False)
            for n in counts:
                for mode in [m for m in args.modes.split(",") if (n, m) in plan]:
                    for h in hosts:
                        h.exec("rm", "-rf", "/srv/models/bench", "/srv/models/.staging/bench")
                    shutil.rmtree(WORK / "seed", ignore_errors=True)
                    flags = {"direct": ["--parallel", str(n)], "sequential": ["--parallel", "1"], "fanout": ["--parallel", str(n), "--from-local", "--dest", str(WORK / "seed")]}[mode]
                    before = proxy.bytes_served("/resolve/")
                    start = time.monotonic()
                    r = subprocess.run([*INVOKE, "fetch-models", "--inventory", str(inv), "--lock", str(project.dir / "models.lock"), "--known-hosts", str(keys / "known_hosts"),
                                        "--hosts", ",".join(h.name for h in hosts[:n]), *flags], env=project.env(), capture_output=True, text=True)
                    wall = time.monotonic() - start
                    if r.returncode != 0:
                        raise SystemExit(r.stdout + r.stderr[-3000:])
                    results.append({"hosts": n, "mode": mode, "wall_s": wall, "hub_bytes": proxy.bytes_served("/resolve/") - before})
                    print(f"{n} host(s) {mode:10s} {wall:7.1f}s  hub {format_bytes(results[-1]['hub_bytes'])}", flush=True)
                    results.sort(key=lambda r: (r["hosts"], r["mode"]))
                    write(results, model_bytes, args.model)
            proxy.stop()
    finally:
        for h in hosts:
            h.stop()


def write(results: list[dict], model_bytes: int, model: str) -> None:
    m = machine()
    one = {r["mode"]: r["wall_s"] for r in results if r["hosts"] == 1}
    md = [
        f"# Fleet: a {format_bytes(model_bytes)} model ({model}) onto bare hosts over SSH",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM; every host is an sshd container on this same machine; {m['date']}.",
        "The hub is the local olah behind a counting proxy that caches files as the hub's CDN does (warmed before the runs; olah alone serves about 27 MB/s here): hub bytes is what the CDN served.",
        "",
        *markdown_table(["hosts", "mode", "wall time", "vs 1 host", "hub bytes"],
                        [[str(r["hosts"]), r["mode"], f"{r['wall_s']:.1f} s", f"{r['wall_s'] / one[r['mode']]:.2f}x", format_bytes(r["hub_bytes"])] for r in results if r["mode"] in one]),
    ]
    save_results("fleet", md, {"machine": m, "model_bytes": model_bytes, "results": results})


if __name__ == "__main__":
    main()
