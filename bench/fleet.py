"""Putting a model on 1, 4 and 8 bare hosts: direct fetch vs controller fan-out vs peer fan-out (vs one host after another).

    .venv/bin/python bench/fleet.py [--model 1g] [--hosts 1,4,8] [--modes direct,fanout,peers,pieces,stripes] [--origin-rate 50] [--repeat 1]

`--origin-rate` throttles the origin's egress (all downloads together, MB/s), as a hub's egress is for many users.
"controller bytes" is what the control machine sent over SSH, counted by a relay in front of each host's sshd.

Hosts are sshd containers with their own filesystems (tests/sshhosts.py); the
hub is the local olah behind a counting, caching proxy that plays the hub's CDN
(warmed once before measuring, so olah's ~27 MB/s does not bound the run);
"hub bytes" is what that CDN served to the hosts. Writes bench/results/fleet.{json,md} after every measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time

from bench.common import RESULTS, ROOT, machine, markdown_table, random_lm, save_results
from ops.localhub import LocalHub
from ops.units import format_bytes
from testbed.helpers import Project
from testbed.proxy import Proxy
from testbed.sshhosts import SshHost, client_keys, counted, ensure_host_image, inventory, start_host

WORK = ROOT / "bench" / "work" / "fleet"
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
PIECES = "64MiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["1g", "tiny"], default="1g")
    ap.add_argument("--hosts", default="1,4,8")
    ap.add_argument("--modes", default="direct,fanout,peers,pieces")
    ap.add_argument("--origin-rate", type=float, default=50.0, help="the origin's egress in MB/s, all downloads together (0: unthrottled)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement: the table gives the median (this shared machine's disk varies)")
    ap.add_argument("--keep", action="store_true", help="keep earlier results for host counts not measured this run")
    ap.add_argument("--sequential-hosts", default="1,2,4", help="host counts measured one after another (each costs n single fetches)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be 1 or more")
    counts = [int(n) for n in args.hosts.split(",")]
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    ensure_host_image()
    weights = random_lm(args.model)
    keys = client_keys(WORK / "keys")
    hosts = [start_host(f"h{i}", keys) for i in range(1, max(counts) + 1)]
    relays = counted(hosts, keys)
    saved = RESULTS / "fleet.json"
    plan = {(n, mode) for n in counts for mode in args.modes.split(",") if mode != "sequential" or str(n) in args.sequential_hosts.split(",")}
    results: list[dict] = [r for r in json.loads(saved.read_text())["results"] if (r["hosts"], r["mode"]) not in plan] if args.keep and saved.exists() else []
    try:
        with LocalHub(WORK / "hub") as hub:
            hub.add_repo("bench/model", {p.name: p for p in weights.iterdir()})
            proxy = Proxy(hub.endpoint, cache_dir=WORK / "cdn").start()  # unthrottled while warming
            project = Project(WORK / "project", proxy.url)
            project.dir.mkdir()
            (project.dir / "models.toml").write_text('[models.bench]\nsource = "hf://bench/model"\nrevision = "main"\n')
            subprocess.run([sys.executable, "-m", "ops.models", "lock"], cwd=project.dir, env=project.env(), check=True, capture_output=True)
            # The same model with piece hashes (cut-through between peers); lock-models --pieces fetches it once, into a store of its own here.
            subprocess.run([sys.executable, "-m", "ops.models", "lock", "--lock", "models-pieces.lock", "--pieces", PIECES, "--dest", str(WORK / "warm-pieces")],
                           cwd=project.dir, env=project.env(), check=True, capture_output=True)
            shutil.rmtree(WORK / "warm-pieces")
            subprocess.run([sys.executable, "-m", "ops.models", "fetch", "--dest", str(WORK / "warm")], cwd=project.dir, env=project.env(), check=True, capture_output=True)
            shutil.rmtree(WORK / "warm")
            proxy.total_rate = args.origin_rate * 1e6 or None
            inv = inventory(project.dir / "hosts.yml", keys, hosts, {name: r.port for name, r in relays.items()})
            model_bytes = sum(p.stat().st_size for p in weights.iterdir())
            disk_rate = disk_write_rate(hosts[0])
            print(f"disk: {disk_rate / 1e6:.0f} MB/s written with fsync inside a host", flush=True)
            # Bootstrap every host first (a verify of the absent model fails, as expected), so runs time fetches only.
            subprocess.run([*INVOKE, "verify-models", "--inventory", str(inv), "--lock", str(project.dir / "models.lock"),
                            "--known-hosts", str(keys / "known_hosts"), "--hosts", ",".join(h.name for h in hosts)], env=project.env(), capture_output=True, check=False)
            for n in counts:
                for mode in [m for m in args.modes.split(",") if (n, m) in plan]:
                    walls, hub_bytes, controller_bytes = [], 0, 0
                    for _ in range(args.repeat):
                        for h in hosts:
                            h.exec("rm", "-rf", "/srv/models/bench", "/srv/models/.staging/bench")
                        shutil.rmtree(WORK / "seed", ignore_errors=True)
                        subprocess.run(["sync"], check=True)  # the last run's writes reach the disk before this one starts
                        flags = {"direct": ["--parallel", str(n)], "sequential": ["--parallel", "1"],
                                 "fanout": ["--parallel", str(n), "--from-local", "--dest", str(WORK / "seed")],
                                 "peers": ["--parallel", str(n), "--fan-out", "peers"], "pieces": ["--parallel", str(n), "--fan-out", "peers"],
                                 "stripes": ["--parallel", str(n), "--fan-out", "peers"]}[mode]
                        lock = project.dir / ("models-pieces.lock" if mode in ("pieces", "stripes") else "models.lock")
                        # stripes: two, whatever the controller would choose for so few hosts (a chain), to measure the striped plan too
                        env = project.env(BAKEHOUSE_FANOUT_STRIPES="2") if mode == "stripes" else project.env()
                        before, sent = proxy.bytes_served("/resolve/"), sum(r.sent for r in relays.values())
                        start = time.monotonic()
                        r = subprocess.run([*INVOKE, "fetch-models", "--inventory", str(inv), "--lock", str(lock), "--known-hosts",
                                            str(keys / "known_hosts"), "--hosts", ",".join(h.name for h in hosts[:n]), *flags], env=env, capture_output=True, text=True,
                                           check=False)
                        walls.append(time.monotonic() - start)
                        if r.returncode != 0:
                            raise SystemExit(r.stdout + r.stderr[-3000:])
                        hub_bytes, controller_bytes = proxy.bytes_served("/resolve/") - before, sum(r.sent for r in relays.values()) - sent
                    results.append({"hosts": n, "mode": mode, "wall_s": statistics.median(walls), "runs_s": walls, "hub_bytes": hub_bytes,
                                    "controller_bytes": controller_bytes, "disk_floor_s": n * model_bytes / disk_rate})
                    print(f"{n} host(s) {mode:10s} {results[-1]['wall_s']:7.1f}s (runs: {', '.join(f'{w:.1f}' for w in walls)})  origin {format_bytes(results[-1]['hub_bytes'])}  "
                          f"controller {format_bytes(results[-1]['controller_bytes'])}", flush=True)
                    results.sort(key=lambda r: (r["hosts"], r["mode"]))
                    write(results, model_bytes, args.model, args.origin_rate, PIECES)
            proxy.stop()
    finally:
        for h in hosts:
            h.stop()
        for r in relays.values():
            r.stop()


def disk_write_rate(host: SshHost, megabytes: int = 1024) -> float:
    """Bytes a second this machine's disk takes with fsync, written where the hosts keep their stores (all hosts share this disk)."""
    host.exec("mkdir", "-p", "/srv/models")
    start = time.monotonic()
    host.exec("dd", "if=/dev/zero", "of=/srv/models/.disk-rate", "bs=1M", f"count={megabytes}", "conv=fsync")
    seconds = time.monotonic() - start
    host.exec("rm", "-f", "/srv/models/.disk-rate")
    return megabytes * 2**20 / seconds


def write(results: list[dict], model_bytes: int, model: str, origin_rate: float, pieces: str) -> None:
    m = machine()
    one = {r["mode"]: r["wall_s"] for r in results if r["hosts"] == 1}
    md = [
        f"# Fleet: a {format_bytes(model_bytes)} model ({model}) onto bare hosts over SSH",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM; every host is an sshd container on this same machine; {m['date']}.",
        "The origin is the local olah behind a counting proxy that caches files as the hub's CDN does (warmed before the runs), its egress throttled to "
        + (f"{origin_rate:g} MB/s for all downloads together" if origin_rate else "nothing (unthrottled)")
        + ": origin bytes is what it served. Controller bytes is what the control machine sent over SSH (a counting relay in front of each sshd).",
        "direct: every host fetches from the origin; fanout: `--from-local` (fetched here once, copied to every host over SFTP); "
        "peers: `--fan-out peers` (hosts copy verified files from each other, each file passed on as soon as it is verified, "
        f"at most 2 peers per source at once); pieces: the same with a lock made by `lock-models --pieces {pieces}` (cut-through: each verified piece "
        "passed on while the rest of its file still arrives; a chain, one peer per source, for this few hosts); stripes: the same with two stripes "
        "(BAKEHOUSE_FANOUT_STRIPES=2: each host takes the even pieces from one host and the odd from another). "
        "Disk floor: the hosts' copies (hosts x model size) at the rate this machine's one disk "
        "took with fsync (dd inside a host), the least any mode can take here, since every host writes to that disk.",
        "",
        "Wall time is the median of the runs listed (this shared machine's disk and CPU vary from run to run).",
        "",
        *markdown_table(["hosts", "mode", "wall time", "runs", "vs 1 host direct", "disk floor", "vs floor", "origin bytes", "controller bytes"],
                        [[str(r["hosts"]), r["mode"], f"{r['wall_s']:.1f} s", ", ".join(f"{w:.1f}" for w in r.get("runs_s", [r["wall_s"]])),
                          f"{r['wall_s'] / one['direct']:.2f}x" if "direct" in one else "-",
                          f"{r['disk_floor_s']:.1f} s" if "disk_floor_s" in r else "-", f"{r['wall_s'] / r['disk_floor_s']:.2f}x" if "disk_floor_s" in r else "-",
                          format_bytes(r["hub_bytes"]), format_bytes(r.get("controller_bytes", 0))] for r in results]),
    ]
    save_results("fleet", md, {"machine": m, "model_bytes": model_bytes, "origin_rate_mb_s": origin_rate, "piece_size": pieces, "results": results})


if __name__ == "__main__":
    main()
