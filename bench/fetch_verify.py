"""Fetch and verify benchmark: bakehouse vs `hf download`, `sha256sum`, `hf cache verify`, in one run.

    .venv/bin/python bench/fetch_verify.py [--gb 1.0] [--shards 4] [--runs 3]

Serves a random-weight safetensors model of --gb GB in --shards shards from the
local hub (olah on loopback), then measures:
  ceiling  curl of every shard, in parallel, to /dev/null (the server's own limit)
  (a)      cold fetch: bakehouse fetch (download + full verify + activate) vs hf download --local-dir
  (b)      re-run when up to date: wall time and HTTP requests reaching the hub
  (c)      full verify: bakehouse verify --full vs sha256sum (files one after another) vs hf cache verify
  (d)      quick verify (stamp)
Writes bench/results/fetch_verify.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import torch
from safetensors.torch import save_file

from bench.common import ROOT, machine, markdown_table, save_results
from ops.localhub import LocalHub
from ops.models.lock import load_lock
from ops.models.store import Store
from ops.models.verify import verify
from testbed.proxy import Proxy

WORK = ROOT / "bench" / "work"
PY = sys.executable
HF = str(Path(PY).with_name("hf"))
REPO = "bench/random-1g"


def make_model(gb: float, shards: int) -> dict[str, Path]:
    src = WORK / "src"
    src.mkdir(parents=True, exist_ok=True)
    per = int(gb * 1e9 / shards / 4)
    files = {}
    for i in range(shards):
        path = src / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        if not path.exists() or path.stat().st_size < per * 4:
            save_file({f"w{i}": torch.rand(per, generator=torch.Generator().manual_seed(i))}, str(path))
        files[path.name] = path
    (src / "config.json").write_text('{"model_type": "random"}\n')
    files["config.json"] = src / "config.json"
    return files


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    print(f"{elapsed:7.2f}s  {' '.join(argv[1:4])}", flush=True)
    return elapsed


def median_runs(runs: int, prepare, argv: list[str], env: dict[str, str]) -> float:
    samples = []
    for _ in range(runs):
        prepare()
        samples.append(timed(argv, env))
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    files = make_model(args.gb, args.shards)
    total = sum(p.stat().st_size for p in files.values())
    shutil.rmtree(WORK / "hub", ignore_errors=True)
    hub = LocalHub(WORK / "hub")
    commit = hub.add_repo(REPO, files)
    hub.start()
    try:
        measure(args, files, total, hub, commit)
    finally:
        hub.stop()


def measure(args: argparse.Namespace, files: dict[str, Path], total: int, hub: LocalHub, commit: str) -> None:
    proj = WORK / "project"
    proj.mkdir(exist_ok=True)
    (proj / "models.toml").write_text(f'[models.bench]\nsource = "hf://{REPO}"\nrevision = "main"\ninclude = ["*.safetensors", "*.json"]\n')
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(WORK / "hf-home"), "PYTHONPATH": str(ROOT)}
    subprocess.run([PY, "-m", "ops.models", "lock", "--models", "bench"], cwd=proj, env=env, check=True, capture_output=True)
    store, hf_dir = WORK / "store", WORK / "hf-local"
    shard_urls = [f"{hub.endpoint}/{REPO}/resolve/{commit}/{name}" for name in files if name.endswith(".safetensors")]
    r: dict[str, float | int] = {"bytes": total}

    # Server ceiling: every shard at once, as both clients download them.
    start = time.monotonic()
    procs = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", url]) for url in shard_urls]
    for p in procs:
        p.wait()
    r["ceiling_s"] = time.monotonic() - start

    fetch = [PY, "-m", "ops.models", "fetch", "--models", "bench", "--lock", str(proj / "models.lock"), "--manifest", str(proj / "models.toml"), "--dest", str(store)]
    hf_dl = [HF, "download", REPO, "--revision", commit, "--local-dir", str(hf_dir), "--include", "*.safetensors", "--include", "*.json"]
    bh_samples, hf_samples = [], []
    for _ in range(args.runs):  # interleaved, so drift on a shared machine hits both alike
        shutil.rmtree(store, ignore_errors=True)
        bh_samples.append(timed(fetch, env))
        shutil.rmtree(hf_dir, ignore_errors=True)
        hf_samples.append(timed(hf_dl, env))
    r["fetch_bakehouse_s"], r["fetch_hf_s"] = statistics.median(bh_samples), statistics.median(hf_samples)

    # (b) up to date: count what reaches the hub through a recording proxy.
    proxy = Proxy(hub.endpoint).start()
    penv = {**env, "HF_ENDPOINT": proxy.url}
    r["rerun_bakehouse_s"] = timed(fetch, penv)
    r["rerun_bakehouse_requests"] = len(proxy.requests)
    proxy.requests.clear()
    r["rerun_hf_s"] = timed(hf_dl, penv)
    r["rerun_hf_requests"] = len(proxy.requests)
    proxy.stop()

    # (c) full verify, files in the page cache for every tool.
    shards = sorted(str(p) for p in (store / "bench" / "current").glob("*.safetensors"))
    verify_cli = [PY, "-m", "ops.models", "verify", "--full", "--models", "bench", "--lock", str(proj / "models.lock"), "--manifest", str(proj / "models.toml"), "--dest", str(store)]
    noop = lambda: None
    r["verify_full_bakehouse_s"] = median_runs(args.runs, noop, verify_cli, env)
    r["verify_sha256sum_s"] = median_runs(args.runs, noop, ["sha256sum", *shards], env)
    r["verify_hf_cache_s"] = median_runs(args.runs, noop, [HF, "cache", "verify", REPO, "--revision", commit, "--local-dir", str(hf_dir)], {**env, "HF_HUB_OFFLINE": "0"})
    model = load_lock(proj / "models.lock").models["bench"]
    directory = Store(store).commit_dir("bench", commit)
    quick = []
    for _ in range(20):
        t0 = time.perf_counter()
        assert verify(directory, model, full=False).ok
        quick.append(time.perf_counter() - t0)
    r["verify_quick_ms"] = statistics.median(quick) * 1000
    r["verify_quick_cli_s"] = median_runs(args.runs, noop, verify_cli[:4] + verify_cli[5:], env)
    write_results(r, machine() | {"huggingface_hub": huggingface_hub.__version__}, args)


def write_results(r: dict, m: dict, args: argparse.Namespace) -> None:
    gb = r["bytes"] / 1e9
    rate = lambda s: f"{gb / s * 1000:.0f} MB/s"
    rows = [
        ("server ceiling (curl, all shards in parallel)", f"{r['ceiling_s']:.2f} s", rate(r["ceiling_s"]), ""),
        ("(a) cold fetch: bakehouse (download + full verify + activate)", f"{r['fetch_bakehouse_s']:.2f} s", rate(r["fetch_bakehouse_s"]), f"{r['fetch_hf_s'] / r['fetch_bakehouse_s']:.2f}x hf download throughput"),
        ("(a) cold fetch: hf download --local-dir (no verify)", f"{r['fetch_hf_s']:.2f} s", rate(r["fetch_hf_s"]), "reference"),
        ("(b) re-run, up to date: bakehouse", f"{r['rerun_bakehouse_s']:.2f} s", f"{r['rerun_bakehouse_requests']} HTTP requests", ""),
        ("(b) re-run, up to date: hf download", f"{r['rerun_hf_s']:.2f} s", f"{r['rerun_hf_requests']} HTTP requests", ""),
        ("(c) full verify: bakehouse verify --full (CLI, incl. start-up)", f"{r['verify_full_bakehouse_s']:.2f} s", rate(r["verify_full_bakehouse_s"]), f"{r['verify_sha256sum_s'] / r['verify_full_bakehouse_s']:.2f}x sha256sum"),
        ("(c) full verify: sha256sum, files one after another", f"{r['verify_sha256sum_s']:.2f} s", rate(r["verify_sha256sum_s"]), "reference"),
        ("(c) full verify: hf cache verify --local-dir", f"{r['verify_hf_cache_s']:.2f} s", rate(r["verify_hf_cache_s"]), f"{r['verify_hf_cache_s'] / r['verify_full_bakehouse_s']:.2f}x slower than bakehouse"),
        ("(d) quick verify (stamp), in process", f"{r['verify_quick_ms']:.1f} ms", "", ""),
        ("(d) quick verify, CLI incl. Python start-up", f"{r['verify_quick_cli_s']:.2f} s", "", ""),
    ]
    md = [
        f"# Fetch and verify: {gb:.2f} GB in {args.shards} safetensors shards, local hub (olah) on loopback",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, Linux {m['kernel']}, Python {m['python']}, huggingface_hub {m['huggingface_hub']}; {m['date']}.",
        f"Medians of {args.runs} runs, bakehouse and reference interleaved in the same run. Verify figures read from the page cache.",
        "",
        *markdown_table(["measure", "time", "rate / requests", "ratio"], [list(row) for row in rows]),
    ]
    save_results("fetch_verify", md, {"machine": m, "results": r, "gb": gb, "shards": args.shards, "runs": args.runs})


if __name__ == "__main__":
    main()
