"""Serving benchmark: start-to-ready and tokens/s under concurrency, against plain transformers.

    .venv/bin/python -m bench.serve [--model tiny|1b] [--requests 32] [--max-tokens 32]
    .venv/bin/python -m bench.serve --vs-vllm --model 130m     (bench/side_by_side.py: against vLLM)

(a) process start -> /ready, split into imports + server up (/health), quick
    verify, load and warm-up (from /metrics), vs a plain script doing
    AutoModelForCausalLM.from_pretrained + tokenizer + first generate.
(b) generated tokens/s at concurrency 1, 8 and 32 through the server, vs the
    same requests run one by one through model.generate in one process.
`tiny` is a random-weight GPT-2 (2 layers) for CPU; `1b` a random-weight
Llama of about 1B parameters for a GPU. Writes bench/results/serve-<model>-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import ROOT, machine, markdown_table, random_lm, save_results
from ops.localhub import LocalHub
from testbed.appserver import start_app

WORK = ROOT / "bench" / "work" / "serve"


def plain_start(path: Path) -> float:
    code = (
        "import time; t=time.monotonic()\n"
        "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"dev='cuda' if torch.cuda.is_available() else 'cpu'\n"
        f"tok=AutoTokenizer.from_pretrained('{path}'); m=AutoModelForCausalLM.from_pretrained('{path}', dtype=torch.bfloat16 if dev=='cuda' else torch.float32).to(dev)\n"
        "ids=tok('Hello', return_tensors='pt').to(dev); m.generate(**ids, max_new_tokens=2, do_sample=False)\n"
        "print(time.monotonic()-t)\n"
    )
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.monotonic() - start


def plain_generate(path: Path, prompts: list[str], max_tokens: int) -> float:
    """tokens/s of model.generate called once per request, in one warm process."""
    code = (
        "import json,sys,time,torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "dev='cuda' if torch.cuda.is_available() else 'cpu'\n"
        f"tok=AutoTokenizer.from_pretrained('{path}'); m=AutoModelForCausalLM.from_pretrained('{path}', dtype=torch.bfloat16 if dev=='cuda' else torch.float32).to(dev).eval()\n"
        "prompts=json.loads(sys.argv[1]); n=0\n"
        "m.generate(**tok('warm', return_tensors='pt').to(dev), max_new_tokens=2)\n"
        "t=time.monotonic()\n"
        "for p in prompts:\n"
        "    ids=tok(p, return_tensors='pt').to(dev)\n"
        f"    with torch.inference_mode(): out=m.generate(**ids, max_new_tokens={max_tokens}, min_new_tokens={max_tokens}, do_sample=True, temperature=0.8)\n"
        "    n+=out.shape[1]-ids['input_ids'].shape[1]\n"
        "print(n/(time.monotonic()-t))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(prompts)], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


async def served_rate(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> float:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(p: str) -> int:
            async with sem:
                r = await client.post(f"{url}/v1/completions", json={"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0.8})
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]
        start = time.monotonic()
        tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
        return tokens / (time.monotonic() - start)


def metric(url: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "130m", "1g", "1b"], default="tiny")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--vs-vllm", action="store_true", help="side by side with vLLM (bench/side_by_side.py)")
    ap.add_argument("--engines", default="transformers,vllm,bare-vllm")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--start-only", action="store_true", help="with --vs-vllm: start to ready only, no loads")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    src = random_lm(args.model)
    shutil.rmtree(WORK / "hub", ignore_errors=True)
    hub = LocalHub(WORK / "hub")
    hub.add_repo(f"bench/{args.model}", {p.name: p for p in src.iterdir()})
    proj, store = WORK / "project", WORK / "store"
    proj.mkdir(exist_ok=True)
    (proj / "models.toml").write_text(f'[models.m]\nsource = "hf://bench/{args.model}"\nrevision = "main"\n')
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1", "MODELS_DIR": str(store), "PYTHONPATH": str(ROOT)}
    with hub:
        env["HF_ENDPOINT"] = hub.endpoint
        for cmd in ("lock", "fetch"):
            subprocess.run([sys.executable, "-m", "ops.models", cmd, "--models", "m", "--dest", str(store)], cwd=proj, env=env, check=True, capture_output=True)
    path = store / "m" / "current"
    if args.vs_vllm:
        from bench.side_by_side import side_by_side

        side_by_side(args.model, store, proj / "models.lock", WORK, args.engines.split(","), args.dtypes.split(","), loads=not args.start_only)
        return
    server_env = {"MODELS_DIR": str(store), "BAKEHOUSE_LOCK": str(proj / "models.lock"), "MODEL": "m", "HF_HUB_OFFLINE": "1",
                  "BAKEHOUSE_MAX_TOKENS": "4000", "BAKEHOUSE_MAX_BATCH": "32"}
    r: dict[str, float] = {}
    start = time.monotonic()
    server = start_app(server_env, WORK / "server.log", compile_kernels=True)
    try:
        server.wait("/health", 200, timeout=300)
        r["health_s"] = time.monotonic() - start
        server.wait("/ready", 200, timeout=600)
        r["ready_s"] = time.monotonic() - start
        for key, name in (("verify_s", "bakehouse_model_verify_seconds"), ("load_s", "bakehouse_model_load_seconds"), ("warmup_s", "bakehouse_model_warmup_seconds")):
            r[key] = metric(server.url, name)
        prompts = [f"The baker {i} says" for i in range(args.requests)]
        asyncio.run(served_rate(server.url, "m", prompts[:4], 4, 4))
        for c in (1, 8, 32):
            r[f"served_c{c}_tps"] = asyncio.run(served_rate(server.url, "m", prompts, c, args.max_tokens))
    finally:
        server.stop()
    r["plain_start_s"] = plain_start(path)
    r["plain_sequential_tps"] = plain_generate(path, prompts, args.max_tokens)
    write(args, r)


def write(args: argparse.Namespace, r: dict[str, float]) -> None:
    m = machine()
    device = m["gpu"] or f"CPU: {m['cpu']}, {m['cores']} cores"
    base = r["plain_sequential_tps"]
    start_rows = [
        ["bakehouse: process start to /ready", f"{r['ready_s']:.2f}"],
        ["— imports and server up (/health answers)", f"{r['health_s']:.2f}"],
        ["— quick verify", f"{r['verify_s']:.3f}"],
        ["— load", f"{r['load_s']:.2f}"],
        ["— warm-up", f"{r['warmup_s']:.2f}"],
        ["plain script: from_pretrained + first generate", f"{r['plain_start_s']:.2f}"],
    ]
    rate_rows = [["plain model.generate, one request at a time", f"{base:.0f}", "1.00x"]]
    rate_rows += [[f"bakehouse server, concurrency {c}", f"{r[f'served_c{c}_tps']:.0f}", f"{r[f'served_c{c}_tps'] / base:.2f}x"] for c in (1, 8, 32)]
    md = [
        f"# Serving: {args.model} model on {device}",
        "",
        f"torch {m['torch']}, {args.requests} requests of {args.max_tokens} tokens each, temperature 0.8; {m['date']}.",
        "",
        *markdown_table(["start to ready", "seconds"], start_rows),
        "",
        *markdown_table(["throughput", "generated tokens/s", "vs one-by-one"], rate_rows),
    ]
    save_results(f"serve-{args.model}-{'gpu' if m['gpu'] else 'cpu'}", md, {"device": device, "results": r, "args": vars(args)})


if __name__ == "__main__":
    main()
