"""Fetch and verify benchmark: bakehouse vs `hf download`, `sha256sum`, `hf cache verify`, in one run.

    .venv/bin/python -m bench.fetch_verify [--gb 1.0] [--shards 4] [--runs 3]
    .venv/bin/python -m bench.fetch_verify --origin nginx

With --origin nginx (bench/results/fetch-nginx.*): the same hub paths served by
nginx from disk (the hub API still from olah), so the origin is not the limit:
a cold fetch of 4 x 256 MB shards and of one 2 GB file by bakehouse (download,
full verify, fsync, activate) against `curl --parallel` writing the same files
(no verify), `hf download` and `aria2c -x16`, on the same disk; a kill -9 at
50 % and a re-run (bytes the origin sent in all); an up-to-date re-run.

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
    ap.add_argument("--origin", choices=["olah", "nginx"], default="olah")
    args = ap.parse_args()
    if args.origin == "nginx":
        line_rate(args.runs)
        return

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
    verify_cli = [PY, "-m", "ops.models", "verify", "--full", "--models", "bench", "--lock", str(proj / "models.lock"), "--manifest", str(proj / "models.toml"),
                  "--dest", str(store)]
    def noop():
        return None
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
    def rate(s):
        return f"{gb / s * 1000:.0f} MB/s"
    rows = [
        ("server ceiling (curl, all shards in parallel)", f"{r['ceiling_s']:.2f} s", rate(r["ceiling_s"]), ""),
        ("(a) cold fetch: bakehouse (download + full verify + activate)", f"{r['fetch_bakehouse_s']:.2f} s", rate(r["fetch_bakehouse_s"]),
         f"{r['fetch_hf_s'] / r['fetch_bakehouse_s']:.2f}x hf download throughput"),
        ("(a) cold fetch: hf download --local-dir (no verify)", f"{r['fetch_hf_s']:.2f} s", rate(r["fetch_hf_s"]), "reference"),
        ("(b) re-run, up to date: bakehouse", f"{r['rerun_bakehouse_s']:.2f} s", f"{r['rerun_bakehouse_requests']} HTTP requests", ""),
        ("(b) re-run, up to date: hf download", f"{r['rerun_hf_s']:.2f} s", f"{r['rerun_hf_requests']} HTTP requests", ""),
        ("(c) full verify: bakehouse verify --full (CLI, incl. start-up)", f"{r['verify_full_bakehouse_s']:.2f} s", rate(r["verify_full_bakehouse_s"]),
         f"{r['verify_sha256sum_s'] / r['verify_full_bakehouse_s']:.2f}x sha256sum"),
        ("(c) full verify: sha256sum, files one after another", f"{r['verify_sha256sum_s']:.2f} s", rate(r["verify_sha256sum_s"]), "reference"),
        ("(c) full verify: hf cache verify --local-dir", f"{r['verify_hf_cache_s']:.2f} s", rate(r["verify_hf_cache_s"]),
         f"{r['verify_hf_cache_s'] / r['verify_full_bakehouse_s']:.2f}x slower than bakehouse"),
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



LAYOUTS = {"4 x 256 MB": [("shard-1.safetensors", 256), ("shard-2.safetensors", 256), ("shard-3.safetensors", 256), ("shard-4.safetensors", 256)],
           "1 x 2 GB": [("model.safetensors", 2048)]}


def random_files(directory: Path, layout: list[tuple[str, int]]) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, mb in layout:
        path = directory / name
        if not path.exists() or path.stat().st_size != mb << 20:
            with open(path, "wb") as f:
                for _ in range(mb):
                    f.write(os.urandom(1 << 20))
        files[name] = path
    return files


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def line_rate(runs: int) -> None:
    from testbed.nginx import Nginx

    results = []
    runs_dir = WORK / "line-rate" / "run"  # the last run's hubs, nginx and copies, kept to look into; removed by the next run
    shutil.rmtree(runs_dir, ignore_errors=True)
    for label, layout in LAYOUTS.items():
        repo = "bench/" + label.replace(" ", "").replace("x", "-")
        src = random_files(WORK / "line-rate" / "src" / repo.split("/")[1], layout)
        www = WORK / "line-rate" / "www"
        shutil.rmtree(www / repo, ignore_errors=True)
        (www / repo).mkdir(parents=True)
        for name, path in src.items():
            os.link(path, www / repo / name)
        with LocalHub(runs_dir / f"hub-{time.time_ns()}") as hub:
            commit = hub.add_repo(repo, src)
            with Nginx(www, runs_dir / f"nginx-{time.time_ns()}", api=hub.endpoint, repos={repo: commit}, log_bytes=True) as nginx:
                results.append(measure_line_rate(label, repo, commit, src, nginx, runs))
    write_line_rate(results)


def measure_line_rate(label: str, repo: str, commit: str, files: dict[str, Path], nginx: object, runs: int) -> dict:
    from testbed.nginx import Nginx

    assert isinstance(nginx, Nginx)
    total = sum(p.stat().st_size for p in files.values())
    out = WORK / "line-rate" / "out"
    proj = WORK / "line-rate" / "project"
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "models.toml").write_text(f'[models.bench]\nsource = "hf://{repo}"\nrevision = "main"\n')
    env = {**os.environ, "HF_ENDPOINT": nginx.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(WORK / "hf-home"),
           "PYTHONPATH": str(ROOT)}
    subprocess.run([PY, "-m", "ops.models", "lock", "--models", "bench"], cwd=proj, env=env, check=True, capture_output=True)
    urls = [f"{nginx.url}/{repo}/resolve/{commit}/{name}" for name in files]
    fetch = [PY, "-m", "ops.models", "fetch", "--models", "bench", "--lock", str(proj / "models.lock"), "--manifest", str(proj / "models.toml"),
             "--dest", str(out / "store")]
    tools = {
        "origin ceiling: curl --parallel to /dev/null": ["curl", "--parallel", "--parallel-max", "16", "-s", *[a for u in urls for a in ("-o", "/dev/null", u)]],
        "bakehouse fetch (download + full verify + fsync + activate)": fetch,
        "curl --parallel (download only)": ["curl", "--parallel", "--parallel-max", "16", "-s", *[a for i, u in enumerate(urls) for a in ("-o", str(out / "curl" / f"{i}"), u)]],
        "curl --parallel, then sync (the bytes on disk)": ["sh", "-c", 'curl "$@" && sync', "sh", "--parallel", "--parallel-max", "16", "-s",
                                                           *[a for i, u in enumerate(urls) for a in ("-o", str(out / "curl" / f"{i}"), u)]],
        "hf download --local-dir (no verify)": [HF, "download", repo, "--revision", commit, "--local-dir", str(out / "hf")],
        "aria2c -x16 -s16 (download only)": ["aria2c", "-q", "-Z", "-x16", "-s16", "-k1M", "-j4", "--allow-overwrite=true", "-d", str(out / "aria2"), *urls],
    }
    r: dict = {"layout": label, "bytes": total, "cold_caches_dropped": False, "runs": runs, "tools": {}}
    for _ in range(runs):  # the tools interleaved, run after run: a slow spell of the shared machine falls on all of them
        for name, argv in tools.items():
            if argv[0] == "aria2c" and shutil.which("aria2c") is None:
                continue
            shutil.rmtree(out, ignore_errors=True)
            (out / "curl").mkdir(parents=True)
            subprocess.run(["sync"], check=False)  # the last tool's writes do not land in this one's time
            for f in files.values():  # the origin's files in the page cache: the origin is not what is measured
                f.read_bytes()
            nginx.reset()
            t = r["tools"].setdefault(name, {"runs": []})
            t["runs"].append(timed(argv, env))
            t["origin_bytes"] = nginx.served()[1]
    for t in r["tools"].values():
        t["seconds"] = statistics.median(t["runs"])
    curl = r["tools"]["curl --parallel (download only)"]["seconds"]
    bh = r["tools"]["bakehouse fetch (download + full verify + fsync + activate)"]["seconds"]
    r["vs_curl"] = curl / bh
    r["vs_hf"] = r["tools"]["hf download --local-dir (no verify)"]["seconds"] / bh

    # A kill -9 at half the bytes, then the same command again: what the origin sent in all.
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    nginx.reset()
    proc = subprocess.Popen(fetch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = out / "store" / ".staging" / "bench"
    while proc.poll() is None:
        written = sum(p.stat().st_blocks * 512 for p in staging.rglob("*.partial/*") if p.is_file()) if staging.exists() else 0
        if written >= total // 2:
            proc.kill()
            break
        time.sleep(0.005)
    proc.wait()
    killed_at = nginx.served()[1]
    resumed = timed(fetch, env)
    r["crash"] = {"origin_bytes_at_kill": killed_at, "origin_bytes_total": nginx.served()[1], "ratio": nginx.served()[1] / total, "resume_s": resumed}

    nginx.reset()
    r["up_to_date_s"] = timed(fetch, env)
    r["up_to_date_requests"] = nginx.served()[0]
    print(r, flush=True)
    return r


def write_line_rate(results: list[dict]) -> None:
    from bench.common import cpu_line

    m = machine() | {"huggingface_hub": huggingface_hub.__version__}
    rows = []
    for r in results:
        gb = r["bytes"] / 1e9
        for name, t in r["tools"].items():
            rows.append([r["layout"], name, f"{t['seconds']:.2f} s", f"{min(t['runs']):.2f}-{max(t['runs']):.2f} s", f"{gb / t['seconds'] * 1000:.0f} MB/s",
                         f"{t['origin_bytes'] / r['bytes']:.2f}"])
    summary = [[r["layout"], f"{r['vs_curl']:.2f}x", f"{r['vs_hf']:.2f}x", f"{r['crash']['ratio']:.3f}x", f"{r['up_to_date_requests']}",
                f"{r['up_to_date_s']:.2f} s"] for r in results]
    md = [
        "# Fetch at line rate: nginx on loopback as the origin",
        "",
        f"Machine: {cpu_line(m)}; disk: this machine's, shared; commit {m['commit']}, {m['date']}. Median of {results[0]['runs']} runs, the",
        "tools interleaved, the origin's files in the page cache; the ceiling is what nginx serves to a client that writes nothing. bakehouse",
        "downloads by concurrent ranged GETs, writes with O_DIRECT, hashes in order as it writes, fsyncs and activates; the others only download,",
        "through the page cache (on this virtual machine a first write to a page can cost more than receiving it: see the range of curl's runs).",
        "`origin bytes`: what nginx sent, over the model's size (last run). Generated from fetch-nginx.json by bench/fetch_verify.py.",
        "",
        *markdown_table(["model", "tool", "time (median)", "range", "rate", "origin bytes"], rows),
        "",
        *markdown_table(["model", "bakehouse vs curl --parallel", "vs hf download", "origin bytes after a kill -9 at 50 % and a re-run",
                         "requests when up to date", "up-to-date run"], summary),
    ]
    save_results("fetch-nginx", md, {"machine": m, "results": results})


if __name__ == "__main__":
    main()
