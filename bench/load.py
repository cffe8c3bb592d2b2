"""Load at memory speed: from a passed quick verify to /ready, against one sequential read of the weight files.

    .venv/bin/python -m bench.load [--runs 3]

A random-weight Llama of about 0.75 B parameters in bf16 safetensors (bench.common.random_lm("1b"), ~1.5 GB in
shards), fetched into a store from the local hub. Warm: the files in the page cache, `cat` of them to /dev/null
against the app's own bakehouse_model_start_seconds (/metrics: from its passed quick verify to ready, the load, the
choice of kernels and the warm-up included). Cold, when this machine lets the page cache be dropped: the same after
`echo 3 > /proc/sys/vm/drop_caches`. Writes bench/results/load.{json,md}.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import time
from pathlib import Path

import httpx

from bench.common import ROOT, cpu_line, machine, markdown_table, random_lm, save_results
from bench.fetch_verify import drop_caches
from ops.localhub import LocalHub
from testbed.appserver import start_app
from testbed.helpers import Project

WORK = ROOT / "bench" / "work" / "load"


def cat_seconds(files: list[Path]) -> float:
    start = time.monotonic()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - start


def metric(url: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", httpx.get(f"{url}/metrics", timeout=30).text, re.M)
    return float(m.group(1)) if m else float("nan")


def app_load(project: Project, log: Path) -> dict[str, float]:
    started = time.monotonic()
    s = start_app(project.env(BAKEHOUSE_LOCK=str(project.dir / "models.lock"), HF_HUB_OFFLINE="1", MODEL="bench", BAKEHOUSE_DTYPE="bfloat16"), log)
    try:
        s.wait(timeout=600)
        wall = time.monotonic() - started
        start, load, warm, verify = (metric(s.url, f"bakehouse_model_{n}_seconds") for n in ("start", "load", "warmup", "verify"))
    finally:
        s.stop()
    return {"verify_to_ready_s": start, "load_s": load, "warmup_s": warm, "quick_verify_s": verify, "process_start_to_ready_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    weights = random_lm("1b")
    WORK.mkdir(parents=True, exist_ok=True)
    with LocalHub(WORK / f"hub-{time.time_ns()}") as hub:
        hub.add_repo("bench/model", {p.name: p for p in weights.iterdir() if p.is_file()})
        project = Project(WORK / f"project-{time.time_ns()}", hub.endpoint)
        project.dir.mkdir(parents=True)
        project.write_manifest('[models.bench]\nsource = "hf://bench/model"\nrevision = "main"\n')
        assert project.run("lock", "--models", "bench").returncode == 0 and project.run("fetch", "--models", "bench").returncode == 0
    files = sorted((project.store / "bench" / "current").glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    cat_seconds(files)  # into the page cache
    warm = [(cat_seconds(files), app_load(project, WORK / f"warm-{i}.log")) for i in range(args.runs)]
    r: dict = {"bytes": size, "files": len(files), "warm": {"cat_s": statistics.median(c for c, _ in warm),
                                                             **{k: statistics.median(a[k] for _, a in warm) for k in warm[0][1]}}}
    r["warm"]["ratio"] = r["warm"]["verify_to_ready_s"] / r["warm"]["cat_s"]
    if drop_caches():
        cold_cat = cat_seconds(files)
        drop_caches()
        cold_app = app_load(project, WORK / "cold.log")
        r["cold"] = {"cat_s": cold_cat, **cold_app, "ratio": cold_app["verify_to_ready_s"] / cold_cat}
    write(r)


def write(r: dict) -> None:
    m = machine()
    gb = r["bytes"] / 1e9
    rows = []
    for label in ("warm", "cold"):
        if label in r:
            x = r[label]
            rows.append([f"{label} ({'page cache' if label == 'warm' else 'caches dropped'})", f"{x['cat_s']:.2f} s ({gb / x['cat_s']:.2f} GB/s)",
                         f"{x['verify_to_ready_s']:.2f} s", f"{x['load_s']:.2f} s", f"{x['warmup_s']:.2f} s", f"{x['ratio']:.2f}x",
                         f"{x['process_start_to_ready_s']:.1f} s"])
    md = [
        f"# Load: a {gb:.2f} GB bf16 model from a verified store to /ready",
        "",
        f"Machine: {cpu_line(m)}; commit {m['commit']}, {m['date']}. {r['files']} safetensors shards; BAKEHOUSE_DTYPE=bfloat16 (no precision check).",
        "`verify to ready`: the app's own time from its passed quick verify to ready (load, kernel choice, warm-up), against one `cat` of the",
        "weight files. The linear layers are packed for oneDNN after ready, between steps.",
        "Generated from load.json by bench/load.py.",
        "",
        *markdown_table(["cache", "cat of the files", "verify to ready", "load", "warm-up", "vs cat", "process start to ready"], rows),
    ]
    save_results("load", md, {"machine": m, "results": r})


if __name__ == "__main__":
    main()
