"""Peer fan-out at fleet scale, simulated, calibrated against the measured runs of bench/fleet.py.

    python -m bench.fanout_sim [--measure-cpu-mb 512]

A fluid model of `fetch-models --fan-out peers`, with the sources the controller gives each host: store-and-forward
(files without pieces), the tree by join order where each host feeds FANOUT others; cut-through (files with pieces), one
tree per stripe from ops.remote.peers.stripe_plan, the stripes chosen as the controller chooses them. Every host pulls
from its source in each stripe as fast as the slowest of these allows: its own link (shared by its stripes), its
source's link (shared by the pulls it serves), the origin's egress, the host's disk, and its CPU (the real code's cost
per byte moved, measured here on this machine: sending, receiving, sha256 of the file and, with pieces, of each piece).
What a source can give: store-and-forward, the files it has completed; cut-through, the whole pieces it has verified.
Slow hosts (a tenth of the link; with pieces their children drop them once a piece comes SLOW_FACTOR times slower than
the others, and take those stripes from the slow host's own source) and hosts that die mid-run (their children take
that stripe from the dead host's own source, keeping what they have) can be mixed in.

Calibration: with the measured runs' own conditions (every host on this one machine: 2 cores and one disk shared,
the origin at 50 MB/s, the 947 MB model in 4 files), the simulator must reproduce bench/results/fleet.json's
1/4/8-host peer runs, store-and-forward and cut-through, within 15 %; the one fitted number is the fixed set-up time
of a run (SSH, bootstrap, peer server start), taken from the 1-host runs. Then it projects 100 to 10,000 hosts with
hosts of their own (300 MB/s links as Kraken's agents are capped, NVMe disks, the CPU cost per byte measured here).
Writes bench/results/fanout-sim.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bench.common import RESULTS, ROOT, cpu_line, machine, markdown_table, save_results
from ops.models.peer_pieces import PACE_SAMPLES, SLOW_FACTOR

DISK = 2e9  # bytes/s a projected host writes (an NVMe disk)
CORES = 8  # a projected host's cores
CONTROLLER_CORES = 8  # the control machine's, for the start spread
KRAKEN = {"hosts": 2600, "model_gb": 3.0, "p50_s": 10.0, "p99_s": 18.0, "link_mb_s": 300.0}  # Uber's published figure (Kraken's README)


@dataclass(frozen=True)
class Fleet:
    hosts: int
    files: tuple[int, ...]  # bytes of each file, fetched largest first
    piece: int  # 0: store-and-forward (a file passes on whole once verified, FANOUT peers a host); else cut-through in pieces of this size
    stripes: int  # cut-through: piece k travels down stripe k mod stripes (ops.remote.peers.stripe_plan)
    origin_rate: float  # bytes/s, all downloads from the origin together
    link_rate: float  # bytes/s a host sends, and receives
    disk_rate: float  # bytes/s a host writes (shared: the machine's one disk)
    cores: float  # a host's cores (shared: the machine's)
    recv_cpu: float  # core-seconds per byte received (receive, sha256, pieces' sha256, write)
    send_cpu: float  # core-seconds per byte sent by a peer server
    origin_cpu: float = 0.0  # core-seconds per byte the origin serves, where it runs on the same machine (the calibration runs)
    shared: bool = False  # every host on one machine: cores and disk are the machine's, shared by all
    setup_s: float = 0.0  # a run's fixed cost before bytes move (SSH, bootstrap, peer servers)
    slow: float = 0.0  # fraction of hosts whose link runs at a tenth
    dead: float = 0.0  # fraction of hosts that die mid-run
    seed: int = 0

    @property
    def size(self) -> int:
        return sum(self.files)


@dataclass(frozen=True)
class Outcome:
    p50_s: float  # of the hosts whose own link is not slow (the slow ones' time is their link's, whatever the fan-out)
    p99_s: float
    last_s: float
    origin_copies: float  # origin egress over the model's size
    slow_last_s: float = 0.0  # the last of the slow hosts


def sources(fleet: Fleet) -> np.ndarray:
    """Each host's source in each stripe (-1: the origin): the controller's plan."""
    from ops.remote.peers import FANOUT, stripe_plan

    if fleet.piece:
        return np.array(stripe_plan(fleet.hosts, fleet.stripes))
    return ((np.arange(fleet.hosts) - 1) // FANOUT).reshape(-1, 1)  # store-and-forward: the earliest host with a free slot, by join order


def available(received: np.ndarray, fleet: Fleet, share: float, bounds: np.ndarray) -> np.ndarray:
    """What each host can pass on in each stripe: whole verified pieces (cut-through), or the whole files it has (store-and-forward)."""
    if fleet.piece:
        return np.where(received >= share, share, (received // fleet.piece) * fleet.piece)
    whole = np.zeros_like(received)
    for end in bounds[1:]:
        whole = np.where(received >= end, end, whole)
    return whole


def simulate(fleet: Fleet, dt: float = 0.01, limit_s: float = 3600.0) -> Outcome:
    """Time-stepped fluid model: every step, each host pulls what its source in each stripe can give, as fast as links, disks and CPUs allow."""
    n = fleet.hosts
    rng = np.random.default_rng(fleet.seed)
    parent = sources(fleet)
    d = parent.shape[1]
    share = fleet.size / d  # bytes a stripe carries
    link = np.full(n, fleet.link_rate)
    slow = rng.random(n) < fleet.slow
    slow[0] = False
    link[slow] = fleet.link_rate / 10
    dies_at = np.where(rng.random(n) < fleet.dead, rng.uniform(0, fleet.size / fleet.link_rate, n) + fleet.setup_s, np.inf)
    dies_at[0] = np.inf  # the root's death sends everyone to the origin: not modelled
    # Cut-through drops a peer that sends a piece SLOW_FACTOR times slower than the file's pieces came (ops.models.peer_pieces): the
    # children of a slow host take its stripes from its own source once they have timed a few pieces and that one.
    drop_slow_at = fleet.setup_s + (PACE_SAMPLES + SLOW_FACTOR) * fleet.piece * d / fleet.link_rate if fleet.piece else np.inf
    received = np.zeros((n, d))
    finished = np.full(n, np.inf)
    alive = np.ones(n, dtype=bool)
    bounds = np.concatenate([[0], np.cumsum(sorted(fleet.files, reverse=True))]).astype(float)
    from_origin, t = 0.0, 0.0
    while t < limit_s and np.any(alive & ~np.isfinite(finished)):
        for h in np.nonzero(alive & (dies_at <= t))[0]:  # its children take each stripe from its own source in that stripe
            alive[h] = False
            for s in range(d):
                parent[parent[:, s] == h, s] = parent[h, s]
        if t >= drop_slow_at:
            for h in np.nonzero(slow)[0]:
                for s in range(d):
                    parent[parent[:, s] == h, s] = parent[h, s]
            drop_slow_at = np.inf
        src = np.maximum(parent, 0)
        have = np.where(parent >= 0, available(received, fleet, share, bounds)[src, np.arange(d)], share)
        pulling = alive[:, None] & (t >= fleet.setup_s) & (received < have)
        from_peer = pulling & (parent >= 0)
        children = np.bincount(src[from_peer], minlength=n)  # pulls each host serves now, all stripes
        down = link / np.maximum(pulling.sum(axis=1), 1)  # a host's link shared by its stripes in flight
        up = np.where(parent >= 0, link[src] / np.maximum(children[src], 1), fleet.origin_rate / max(int((pulling & (parent < 0)).sum()), 1))
        rate = np.where(pulling, np.minimum(down[:, None], up), 0.0)
        recv = rate.sum(axis=1)
        sent = np.bincount(src[from_peer], weights=rate[from_peer], minlength=n)
        if fleet.shared:  # one machine: its cores and its disk serve every host and the origin
            cpu = recv.sum() * fleet.recv_cpu + sent.sum() * fleet.send_cpu + rate[parent < 0].sum() * fleet.origin_cpu
            rate = rate * min(1.0, fleet.cores / cpu if cpu else 1.0, fleet.disk_rate / recv.sum() if recv.sum() else 1.0)
        else:  # each host its own: the slower of the receiver and the sender bounds a pull
            cpu = recv * fleet.recv_cpu + sent * fleet.send_cpu
            own = np.minimum(1.0, np.minimum(np.divide(fleet.cores, cpu, out=np.ones(n), where=cpu > 0),
                                             np.divide(fleet.disk_rate, recv, out=np.ones(n), where=recv > 0)))
            rate = rate * np.minimum(own[:, None], np.where(parent >= 0, own[src], 1.0))
        step = np.where(pulling, np.minimum(rate * dt, have - received), 0.0)
        received += step
        from_origin += float(step[parent < 0].sum())
        t += dt
        complete = received.sum(axis=1) >= fleet.size - 1
        finished = np.where(np.isfinite(finished) | ~alive | ~complete, finished, t)
    done = alive & np.isfinite(finished)
    times = finished[done & ~slow]
    return Outcome(float(np.percentile(times, 50)), float(np.percentile(times, 99)), float(times.max()), from_origin / fleet.size,
                   float(finished[done & slow].max()) if np.any(done & slow) else 0.0)


def measure_cpu(megabytes: int, piece: int) -> tuple[float, float]:
    """Core-seconds per byte of the real code, receiving (fetch from a peer) and sending (peer-serve), on this machine."""
    from ops.models.lock import LockedFile, LockedModel
    from ops.models.peer_client import fetch_from_peers
    from ops.models.pieces import hash_pieces
    from ops.models.sources.base import FetchJob
    from ops.models.stamp import write_stamp
    from ops.models.store import Store

    body = os.urandom(megabytes << 20)
    sha = hashlib.sha256(body).hexdigest()
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "work") as tmp:
        root = Path(tmp)
        src = Store(root / "src").commit_dir("m", sha)
        src.mkdir(parents=True)
        (src / "w.bin").write_bytes(body)
        write_stamp(src, "digest", {"w.bin": sha})
        pieces = hash_pieces(src / "w.bin", piece)[1] if piece else ()
        f = LockedFile("w.bin", len(body), sha, piece if piece else 0, pieces)
        model = LockedModel("m", "http://127.0.0.1:9/w.bin", None, sha, "0" * 16, (f,))
        (root / "token").write_text("t" * 32)
        server = subprocess.Popen([sys.executable, "-m", "ops.models", "peer-serve", "--dest", str(root / "src"), "--bind", "127.0.0.1", "--token-file",
                                   str(root / "token"), "--port-file", str(root / "port"), "--seconds", "600"], env={**os.environ, "PYTHONPATH": str(ROOT)})
        while not (root / "port").exists():
            time.sleep(0.05)
        dst = Store(root / "dst")
        job = FetchJob(root=root / "dst", staging=dst.staging_dir("m", sha), partial=dst.partial_dir("m", sha),
                       progress=SimpleNamespace(update=lambda n: None))  # type: ignore[arg-type]
        (root / "dst").mkdir()
        before, server_before = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(server.pid)
        known, _, _ = fetch_from_peers(model, [f], job, [f"http://127.0.0.1:{(root / 'port').read_text()}"], "t" * 32)
        after, server_after = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(server.pid)
        assert known == {"w.bin": sha}
        server.terminate()
        server.wait()
    recv = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / len(body)
    return recv, (server_after - server_before) / len(body)  # the server's start (imports) is not a cost per byte


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def calibration(measured: dict, recv_cpu: dict[int, float], send_cpu: float) -> list[dict]:
    """The measured 1/4/8-host runs against the simulator under their conditions; set-up time fitted on the 1-host run of each mode."""
    from ops.models.lock import LockedFile, LockedModel
    from ops.remote.peers import fanout_stripes

    results = measured["results"]
    files = tuple(measured.get("files") or [measured["model_bytes"] // 4] * 4)
    piece = 64 << 20
    rows = []
    for mode, p in (("peers", 0), ("pieces", piece), ("stripes", piece)):
        runs = {r["hosts"]: r for r in results if r["mode"] == mode}
        if mode == "stripes" and runs and 1 in {r["hosts"] for r in results if r["mode"] == "pieces"}:
            runs = {1: next(r for r in results if r["mode"] == "pieces" and r["hosts"] == 1)} | runs  # one host: no stripes to take
        if 1 not in runs:
            continue
        disk = min(r["hosts"] * measured["model_bytes"] / r["disk_floor_s"] for r in runs.values())
        base = Fleet(hosts=1, files=files, piece=p, stripes=1, origin_rate=measured["origin_rate_mb_s"] * 1e6, link_rate=10e9, disk_rate=disk, cores=2,
                     recv_cpu=recv_cpu[p], send_cpu=send_cpu, origin_cpu=send_cpu, shared=True)
        setup = runs[1]["wall_s"] - simulate(base).last_s
        for hosts, run in sorted(runs.items()):
            lock = LockedModel("m", "http://x/m", None, "0" * 64, "0" * 16,
                               tuple(LockedFile(f"{i}", size, "0" * 64, p, ("0" * 64,) * -(-size // p) if p else ()) for i, size in enumerate(files)))
            stripes = 2 if mode == "stripes" and hosts > 1 else fanout_stripes(hosts, [lock]) or 1  # what the controller used in these runs
            sim = simulate(replace(base, hosts=hosts, stripes=stripes, setup_s=setup))
            rows.append({"mode": mode, "hosts": hosts, "measured_s": run["wall_s"], "simulated_s": sim.last_s, "error": sim.last_s / run["wall_s"] - 1,
                         "setup_s": setup, "stripes": stripes, "disk_rate": disk})
    return rows


def projections(recv_cpu: dict[int, float], send_cpu: float, controller_s_per_host: float) -> list[dict]:
    from ops.models.lock import LockedFile, LockedModel
    from ops.remote.peers import fanout_stripes

    rows = []
    link = KRAKEN["link_mb_s"] * 1e6
    for gb, shards in ((3, 2), (140, 30)):
        files = tuple([int(gb * 1e9 / shards)] * shards)
        for hosts in (100, 1000, 2600, 10_000):
            for mode, piece in (("store-and-forward", 0), ("cut-through", 64 << 20)):
                pieces = ("0" * 64,) * max(1, -(-files[0] // piece)) if piece else ()
                lock = LockedModel("m", "http://x/m", None, "0" * 64, "0" * 16, tuple(LockedFile(f"{i}", s, "0" * 64, piece, pieces) for i, s in enumerate(files)))
                stripes = fanout_stripes(hosts, [lock]) or 1
                fleet = Fleet(hosts=hosts, files=files, piece=piece, stripes=stripes, origin_rate=link, link_rate=link, disk_rate=DISK, cores=CORES,
                              recv_cpu=recv_cpu[piece], send_cpu=send_cpu)
                dt = max(0.01, fleet.size / link / 2000)
                clean = simulate(fleet, dt=dt)
                # long enough for hosts at a tenth of the link, and those below them, to finish
                faulty = simulate(replace(fleet, slow=0.01, dead=0.01, seed=1), dt=dt, limit_s=25 * fleet.size / link)
                spread = hosts * controller_s_per_host / CONTROLLER_CORES
                rows.append({"model_gb": gb, "files": shards, "hosts": hosts, "mode": mode, "stripes": stripes if piece else 0, "p50_s": clean.p50_s, "p99_s": clean.p99_s,
                             "last_s": clean.last_s, "origin_copies": clean.origin_copies, "faulty_p99_s": faulty.p99_s, "faulty_slow_s": faulty.slow_last_s,
                             "faulty_origin_copies": faulty.origin_copies, "controller_spread_s": spread})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.fanout_sim")
    ap.add_argument("--measure-cpu-mb", type=int, default=512, help="size of the file moved to measure the real code's CPU cost per byte")
    ap.add_argument("--report", action="store_true", help="only re-render the tables from bench/results/fanout-sim.json")
    args = ap.parse_args()
    if args.report:
        publish(json.loads((RESULTS / "fanout-sim.json").read_text()))
        return
    (ROOT / "bench" / "work").mkdir(parents=True, exist_ok=True)
    # the median of three runs each: this shared machine's CPU time per byte varies by 10-15 % from run to run
    recv_plain, send = sorted(measure_cpu(args.measure_cpu_mb, 0) for _ in range(3))[1]
    recv_pieces = sorted(measure_cpu(args.measure_cpu_mb, 64 << 20)[0] for _ in range(3))[1]
    recv_cpu = {0: recv_plain, 64 << 20: recv_pieces}
    print(f"CPU per GB: receive {recv_plain * 1e9:.2f} s, with pieces {recv_pieces * 1e9:.2f} s; send {send * 1e9:.2f} s", flush=True)
    measured = json.loads((RESULTS / "fleet.json").read_text())
    controller = json.loads((RESULTS / "fleet-controller.json").read_text())
    per_host = min(r["cpu_s"] / r["hosts"] for r in controller["results"].values())
    cal = calibration(measured, recv_cpu, send)
    for r in cal:
        print(f"calibration {r['mode']:7s} {r['hosts']} hosts: measured {r['measured_s']:.1f} s, simulated {r['simulated_s']:.1f} s ({r['error']:+.0%})", flush=True)
    peers = [r for r in measured["results"] if r["mode"] in ("peers", "pieces", "stripes")]
    costs = {"recv_cpu_s_per_gb": recv_plain * 1e9, "recv_cpu_pieces_s_per_gb": recv_pieces * 1e9, "send_cpu_s_per_gb": send * 1e9,
             "controller_cpu_per_host_s": per_host, "controller_bytes_per_host": max(r["controller_bytes"] / r["hosts"] for r in peers)}
    publish({"machine": machine(), "measured_on": {k: measured["machine"][k] for k in ("cpu", "date")}, "model_bytes": measured["model_bytes"],
             "origin_rate_mb_s": measured["origin_rate_mb_s"], "measured": peers, "costs": costs, "calibration": cal,
             "projections": projections(recv_cpu, send, per_host), "kraken": KRAKEN,
             "projected_host": {"link_mb_s": KRAKEN["link_mb_s"], "disk_bytes_s": DISK, "cores": CORES, "controller_cores": CONTROLLER_CORES}})


def publish(data: dict) -> None:
    save_results("fanout-sim", render(data), data)
    save_results("fleet-summary", summary(data), {k: data[k] for k in ("machine", "measured_on", "model_bytes", "origin_rate_mb_s", "measured", "projections", "kraken")})


def render(data: dict) -> list[str]:
    m, costs, cal, proj = data["machine"], data["costs"], data["calibration"], data["projections"]
    ok = all(abs(r["error"]) <= 0.15 for r in cal)
    return [
        "# Peer fan-out at fleet scale: the simulator, checked against measured runs, then projected",
        "",
        f"Simulated on {cpu_line(m)}; commit {m['commit']}; {m['date']}. CPU cost of the real code, measured here per GB moved: "
        f"receiving {costs['recv_cpu_s_per_gb']:.2f} core-s (with piece hashes {costs['recv_cpu_pieces_s_per_gb']:.2f}), "
        f"serving {costs['send_cpu_s_per_gb']:.2f} core-s. Controller: {costs['controller_cpu_per_host_s'] * 1e3:.1f} ms of CPU per host "
        f"(bench/results/fleet-controller.json), {costs['controller_bytes_per_host'] / 1e3:.1f} KB sent per host (bench/results/fleet.json).",
        "",
        f"## Calibration: the measured runs (bench/results/fleet.json, {data['measured_on']['cpu']}, {data['measured_on']['date']}) under their own conditions",
        "",
        "Every host on one 2-core machine sharing one disk, origin at 50 MB/s; the fixed set-up time is fitted on each mode's 1-host run. "
        + ("Every run reproduced within 15 %." if ok else "Not every run is within 15 %: see the error column."),
        "",
        *markdown_table(["mode", "hosts", "stripes", "measured", "simulated", "error"],
                        [[r["mode"], str(r["hosts"]), str(r["stripes"]) if r["mode"] != "peers" else "-", f"{r['measured_s']:.1f} s", f"{r['simulated_s']:.1f} s",
                          f"{r['error']:+.0%}"] for r in cal]),
        "",
        f"## Projection: hosts of their own, {KRAKEN['link_mb_s']:g} MB/s links (Kraken's cap per agent), origin at the same rate, "
        f"{DISK / 1e9:g} GB/s disks, {CORES} cores",
        "",
        "Times from the moment every host is asked (as Kraken's figure counts); the controller's start spread (its CPU per host, "
        f"{CONTROLLER_CORES} cores) is a column of its own. Faulty: 1 % of hosts at a tenth of the link and 1 % dying mid-run; its p99 is "
        "that of the other hosts (what the slow and dead ones cost them), and the slow hosts' own last time is beside it. "
        f"Kraken's published figure: {KRAKEN['model_gb']:g} GB to {KRAKEN['hosts']} hosts in p50 {KRAKEN['p50_s']:g} s, p99 {KRAKEN['p99_s']:g} s.",
        "",
        *markdown_table(["model", "hosts", "mode", "stripes", "p50", "p99", "last host", "origin egress", "p99, faulty", "slow hosts, faulty", "origin, faulty",
                         "controller spread", "controller egress"],
                        [[f"{r['model_gb']} GB ({r['files']} files)", f"{r['hosts']:,}", r["mode"], str(r["stripes"] or "-"), f"{r['p50_s']:.1f} s", f"{r['p99_s']:.1f} s",
                          f"{r['last_s']:.1f} s", f"{r['origin_copies']:.2f} copies", f"{r['faulty_p99_s']:.1f} s",
                          f"{r['faulty_slow_s']:.1f} s" if r["faulty_slow_s"] else "-", f"{r['faulty_origin_copies']:.2f} copies",
                          f"{r['controller_spread_s']:.1f} s", f"{r['hosts'] * costs['controller_bytes_per_host'] / 1e6:.1f} MB"] for r in proj]),
    ]


def summary(data: dict) -> list[str]:
    """Measured and projected side by side with Kraken's published figure (for the README)."""
    size = f"{data['model_bytes'] / 1e9:.2f} GB"
    how = {"pieces": "pieces, a chain", "stripes": "pieces, 2 stripes"}
    rows = [[f"measured here ({data['measured_on']['cpu']}, all hosts on one 2-core machine, origin {data['origin_rate_mb_s']:g} MB/s)", str(r["hosts"]),
             size, how.get(r["mode"], "whole files"), "-", f"{r['wall_s']:.1f} s (whole run)", f"{r['hub_bytes'] / data['model_bytes']:.2f}"]
            for r in data["measured"] if r["hosts"] == max(x["hosts"] for x in data["measured"])]
    rows += [[f"projected ({KRAKEN['link_mb_s']:g} MB/s links)", f"{r['hosts']:,}", f"{r['model_gb']} GB",
              "pieces (cut-through)" if r["mode"] == "cut-through" else "whole files", f"{r['p50_s']:.1f} s", f"{r['p99_s']:.1f} s", f"{r['origin_copies']:.2f}"]
             for r in data["projections"] if r["model_gb"] == KRAKEN["model_gb"] and r["hosts"] in (KRAKEN["hosts"], 10_000)]
    rows.append([f"Kraken, published ({KRAKEN['link_mb_s']:g} MB/s cap per agent)", f"{KRAKEN['hosts']:,}", f"{KRAKEN['model_gb']:g} GB", "pieces",
                 f"{KRAKEN['p50_s']:g} s", f"{KRAKEN['p99_s']:g} s", "-"])
    return ["# Fleet fan-out: measured, projected, and Kraken's figure", "",
            "From bench/results/fleet.json (measured) and bench/results/fanout-sim.json (the simulator, calibrated on those runs); see docs/fleet.md.", "",
            *markdown_table(["", "hosts", "model", "passed on as", "p50", "p99 / last host", "origin egress (copies)"], rows)]




if __name__ == "__main__":
    main()
