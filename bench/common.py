"""Shared by the benchmarks: the machine's description and random-weight models of real architectures."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

DEMO = ROOT / "demo" / "demo-tiny"
RESULTS = ROOT / "bench" / "results"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(row) + " |" for row in rows]]


def save_results(name: str, md: list[str], data: dict) -> None:
    """bench/results/<name>.md (the table for people) and <name>.json (the numbers), printed too."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    print("\n".join(md))


def machine() -> dict[str, str]:
    """Where a figure was measured: lscpu's model name and flags, cores, memory, GPU, versions, and the commit."""
    lscpu = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines() if ":" in line)
    cpu = lscpu.get("Model name", platform.processor()).strip()
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, check=False).stdout.strip()
    return {"cpu": cpu, "cpu_flags": lscpu.get("Flags", "").strip(), "cores": str(os.cpu_count()), "memory_gb": f"{int(mem) / 1e6:.0f}", "gpu": gpu,
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__, "commit": commit, "date": time.strftime("%Y-%m-%d")}


def cpu_line(m: dict[str, str]) -> str:
    """The CPU a figure holds for, with the flags that change CPU inference (AMX, AVX-512 BF16)."""
    flags = set(m.get("cpu_flags", "").split())
    notable = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{m['cpu']} ({', '.join(notable) or 'no AVX-512/AMX'}), {m['cores']} cores, {m['memory_gb']} GB"


def random_lm(kind: str) -> Path:
    """A random-weight causal LM with the demo tokenizer: `tiny` (GPT-2, 2 layers), `130m` (Llama, ~130M params), `1g` (Llama, ~1 GB fp32),
    `1b` (Llama, ~1B params, bf16).

    Made once, kept under bench/work/models/ for every benchmark.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    out = ROOT / "bench" / "work" / "models" / kind
    if out.exists():
        return out
    torch.manual_seed(0)
    common = {"vocab_size": 401, "bos_token_id": 400, "eos_token_id": 400}
    if kind == "tiny":
        model = GPT2LMHeadModel(GPT2Config(n_positions=4096, n_embd=128, n_layer=2, n_head=4, **common))
    elif kind == "130m":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=14, num_attention_heads=12,
                                             num_key_value_heads=12, max_position_embeddings=2048, **common))
    elif kind == "1g":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
                                             num_key_value_heads=8, max_position_embeddings=4096, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                                             num_key_value_heads=8, max_position_embeddings=4096, **common)).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="300MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, out / name)
    return out
