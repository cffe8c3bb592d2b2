"""Where a step of the transformers engine goes, on fixed and mixed loads: the engine in this process, each part of a step timed.

    .venv/bin/python -m bench.step_profile [--model 130m] [--dtypes bfloat16,float32]

The loads of the side-by-side benchmark (bench/side_by_side.py): 64 requests of 128-token prompts, fixed (64 new tokens each) or
mixed (16-256, the same seed), at most 32 running at once, temperature 0, EOS ignored. The scheduler runs as in the server, with
timers wrapped around its parts (no change to the product's code; oneDNN's primitive cache capped as the server caps it): the forward pass and,
inside it, the attention and the cache
writes; the cache's planning (seats and masks), sampling, detokenizing and the policy. The HTTP side is not in it: the
side-by-side run's tokens/s against these show what it costs. Also recorded: the width decode attention reads against the rows'
real lengths (what padding costs). Writes bench/results/step-profile-<model>-cpu-<maker>.{md,json}.
"""

from __future__ import annotations

import os

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")  # as the server's entrypoint sets it, before torch is imported

import argparse
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface

from app import kvcache
from app import scheduler as scheduler_module
from app.device import DevicePlan
from app.engine import Engine
from app.metrics import Metrics
from app.params import Output, SamplingParams
from app.scheduler import Scheduler, choice
from bench.common import cpu_line, machine, markdown_table, random_lm, save_results
from bench.side_by_side import CONCURRENCY, LOADS, PROMPT_TOKENS, cpu_kind

PARTS = ["attention", "cache writes", "rest of the forward pass (linear layers, norms, MLP)", "cache planning (seats, masks)", "sampling",
         "detokenizing", "policy (schedule, update)", "the rest of the step loop"]


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.widths: list[tuple[int, int]] = []  # per step: columns decode attention reads (all rows), real columns

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed


def instrument(sched: Scheduler, timers: Timers) -> None:
    """Timers around the scheduler's parts, on this instance and the modules it calls."""
    AttentionInterface.register(kvcache.SLOT_ATTENTION, timers.wrap("attention", kvcache.slot_attention))
    for layer in sched.cache.slot_layers:
        layer.update = timers.wrap("cache writes", layer.update)  # type: ignore[method-assign]
    plan = sched.cache.plan

    def planned(*args: Any, **kwargs: Any) -> kvcache.Step:
        step = plan(*args, **kwargs)
        if step.rows and step.lengths is not None:
            read = sum(len(g.rows) * g.width for g in step.groups)
            timers.widths.append((read, int(step.lengths.sum()) + step.rows))
        return step

    sched.cache.plan = timers.wrap("cache planning (seats, masks)", planned)  # type: ignore[method-assign]
    sched.engine.forward = timers.wrap("forward", sched.engine.forward)  # type: ignore[method-assign]
    scheduler_module.sample = timers.wrap("sampling", scheduler_module.sample)
    sched._decode = timers.wrap("detokenizing", sched._decode)  # type: ignore[method-assign]
    sched.policy.schedule = timers.wrap("policy (schedule, update)", sched.policy.schedule)  # type: ignore[method-assign]
    sched.policy.update = timers.wrap("policy (schedule, update)", sched.policy.update)  # type: ignore[method-assign]
    sched._step = timers.wrap("step", sched._step)  # type: ignore[method-assign]


def run_load(engine: Engine, load: str, concurrency: int, count: int) -> dict[str, Any]:
    rng = random.Random(f"{load}-{count}")  # the side-by-side benchmark's requests
    reqs = [([rng.randrange(engine.tokenizer.vocab_size - 1) for _ in range(PROMPT_TOKENS)], LOADS[load](rng)) for _ in range(count)]
    sched = Scheduler(engine, Metrics(), max_batch=concurrency).start()
    timers = Timers()
    instrument(sched, timers)
    done = threading.Semaphore(0)
    tokens = [0]

    def emit(out: Output) -> None:
        tokens[0] += len(out.token_ids)
        if out.finish is not None:
            done.release()

    start = time.perf_counter()
    sched.submit([choice(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), engine.context, emit) for p, n in reqs])
    for _ in reqs:
        done.acquire()
    wall = time.perf_counter() - start
    sched.stop()
    s = timers.seconds
    steps = len(timers.widths) or 1
    inner = s["attention"] + s["cache writes"]
    step_parts = s["forward"] + s["cache planning (seats, masks)"] + s["sampling"] + s["detokenizing"]
    parts = {"attention": s["attention"], "cache writes": s["cache writes"], PARTS[2]: s["forward"] - inner,
             "cache planning (seats, masks)": s["cache planning (seats, masks)"], "sampling": s["sampling"], "detokenizing": s["detokenizing"],
             "policy (schedule, update)": s["policy (schedule, update)"] - s["detokenizing"],
             "the rest of the step loop": max(wall - step_parts - (s["policy (schedule, update)"] - s["detokenizing"]), 0.0)}
    read, real = map(sum, zip(*timers.widths, strict=True)) if timers.widths else (0, 0)
    return {"wall_s": wall, "tokens": tokens[0], "tokens_per_s": tokens[0] / wall, "steps": len(timers.widths), "seconds": parts,
            "ms_per_step": {k: 1e3 * v / steps for k, v in parts.items()}, "attention_columns_read": read, "attention_columns_real": real}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.step_profile")
    ap.add_argument("--model", default="130m", choices=["tiny", "130m", "1g"])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    path = random_lm(args.model)
    m = machine()
    results: dict[str, Any] = {}
    for dtype in args.dtypes.split(","):
        engine = Engine(path, name="m", plan=DevicePlan("cpu", getattr(torch, dtype)))
        engine.pending.pack(float("inf"))  # as the server does after ready: the profile is of steady serving
        for load in LOADS:
            for concurrency in (8, 32):
                key = f"{dtype}/{load}-c{concurrency}"
                results[key] = run_load(engine, load, concurrency, CONCURRENCY[concurrency])
                r = results[key]
                print(f"{key}: {r['tokens_per_s']:.1f} tok/s, {r['steps']} steps, attention reads {r['attention_columns_read'] / max(r['attention_columns_real'], 1):.2f}x "
                      "the real columns", flush=True)
    keys = list(results)
    rows = [[part, *(f"{results[k]['ms_per_step'][part]:.2f} ({100 * results[k]['seconds'][part] / results[k]['wall_s']:.0f} %)" for k in keys)]
            for part in PARTS]
    rows.append(["tokens/s (no HTTP)", *(f"{results[k]['tokens_per_s']:.1f}" for k in keys)])
    rows.append(["steps", *(str(results[k]["steps"]) for k in keys)])
    rows.append(["attention columns read / real", *(f"{results[k]['attention_columns_read'] / max(results[k]['attention_columns_real'], 1):.2f}"
                                                     for k in keys)])
    md = [f"# Where a step goes: {args.model} random-weight model, transformers engine, CPU", "",
          (f"Machine: {cpu_line(m)}; torch {m['torch']}; commit {m['commit']}, {m['date']}. `python -m bench.step_profile`: the side-by-side loads "
           f"({PROMPT_TOKENS}-token prompts, 64 requests, fixed = 64 new tokens, mixed = 16-256) through the scheduler in one process, no HTTP. "
           "Milliseconds per step (share of the run's wall time)."), "",
           *markdown_table(["part", *keys], rows)]
    save_results(f"step-profile-{args.model}-cpu-{cpu_kind(m['cpu'])}", md, {"machine": m, "results": results})


if __name__ == "__main__":
    main()
