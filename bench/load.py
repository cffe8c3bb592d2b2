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
import shutil
import statistics
import subprocess
import sys
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


READ = "import sys, os\nfor f in sys.argv[1:]:\n    b = bytearray(os.path.getsize(f))\n    with open(f, 'rb', buffering=0) as h:\n        h.readinto(b)\n"


def read_seconds(files: list[Path]) -> float:
    """One sequential read of the files into memory: each read whole into a new buffer of its size (a process of its own, timed
    around the reads only, as cat's time is)."""
    out = subprocess.run([sys.executable, "-c", "import time\nt = time.monotonic()\n" + READ + "print(time.monotonic() - t)", *map(str, files)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout)


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
    shutil.rmtree(WORK, ignore_errors=True)  # the last run's hub and store, kept to look into until this one
    WORK.mkdir(parents=True)
    with LocalHub(WORK / f"hub-{time.time_ns()}") as hub:
        hub.add_repo("bench/model", {p.name: p for p in weights.iterdir() if p.is_file()})
        project = Project(WORK / f"project-{time.time_ns()}", hub.endpoint)
        project.dir.mkdir(parents=True)
        project.write_manifest('[models.bench]\nsource = "hf://bench/model"\nrevision = "main"\n')
        assert project.run("lock", "--models", "bench").returncode == 0 and project.run("fetch", "--models", "bench").returncode == 0
    files = sorted((project.store / "bench" / "current").glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    cat_seconds(files)  # into the page cache
    warm = [(cat_seconds(files), read_seconds(files), app_load(project, WORK / f"warm-{i}.log")) for i in range(args.runs)]
    r: dict = {"bytes": size, "files": len(files), "runs": args.runs,
               "warm": {"cat_s": statistics.median(c for c, _, _ in warm), "read_s": statistics.median(m for _, m, _ in warm),
                        **{k: statistics.median(a[k] for _, _, a in warm) for k in warm[0][2]}}}
    r["warm"]["ratio"] = r["warm"]["verify_to_ready_s"] / r["warm"]["read_s"]
    r["warm"]["ratio_cat"] = r["warm"]["verify_to_ready_s"] / r["warm"]["cat_s"]
    if drop_caches():
        cold_cat = cat_seconds(files)
        drop_caches()
        cold_read = read_seconds(files)
        drop_caches()
        cold_app = app_load(project, WORK / "cold.log")
        r["cold"] = {"cat_s": cold_cat, "read_s": cold_read, **cold_app, "ratio": cold_app["verify_to_ready_s"] / cold_read,
                     "ratio_cat": cold_app["verify_to_ready_s"] / cold_cat}
    write(r)


def write(r: dict) -> None:
    m = machine()
    gb = r["bytes"] / 1e9
    rows = []
    for label in ("warm", "cold"):
        if label in r:
            x = r[label]
            rows.append([f"{label} ({'page cache' if label == 'warm' else 'caches dropped'})", f"{x['read_s']:.2f} s ({gb / x['read_s']:.2f} GB/s)",
                         f"{x['cat_s']:.2f} s ({gb / x['cat_s']:.2f} GB/s)", f"{x['verify_to_ready_s']:.2f} s", f"{x['load_s']:.2f} s",
                         f"{x['warmup_s']:.2f} s", f"{x['ratio']:.2f}x", f"{x['ratio_cat']:.2f}x", f"{x['process_start_to_ready_s']:.1f} s"])
    md = [
        f"# Load: a {gb:.2f} GB bf16 model from a verified store to /ready",
        "",
        f"Machine: {cpu_line(m)}; commit {m['commit']}, {m['date']}. {r['files']} safetensors shards; BAKEHOUSE_DTYPE=bfloat16 (no precision check).",
        "`verify to ready`: the app's own time from its passed quick verify to ready (load, kernel choice, warm-up; median of "
        f"{r.get('runs', 1)} warm runs, one cold),",
        "against one sequential read of the weight files into memory (each file read whole into a new buffer) and against `cat` of them",
        "(read through one small buffer, so no memory is filled: the page cache's own rate). The app maps the files (safetensors), so",
        "its weights are the page cache's pages, not a copy. The linear layers are packed for oneDNN after ready, between steps.",
        "Generated from load.json by bench/load.py.",
        "",
        *markdown_table(["cache", "read into memory", "cat of the files", "verify to ready", "load", "warm-up", "vs read", "vs cat",
                         "process start to ready"], rows),
    ]
    save_results("load", md, {"machine": m, "results": r})


if __name__ == "__main__":
    main()
