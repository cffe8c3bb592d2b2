"""Which dtype a CPU serves in by default: bf16 where the CPU computes it natively and the model's outputs survive it.

On CPUs with AVX-512 BF16 or AMX, bf16 runs a decode step 1.4-2x faster than
fp32 and a prompt 2-3x faster (README, "Serving side by side with vLLM"). Not
every model keeps its outputs in bf16, so with `BAKEHOUSE_DTYPE=auto` the
engine loads the model in fp32, runs a fixed English passage through it, casts
it to bf16, runs the passage again, and keeps bf16 only when both hold:

- the most likely next token agrees at >= 99 % of the passage's positions, and
- the mean KL divergence of bf16's next-token distribution from fp32's is at
  most 0.01 nats, and
- bf16 is faster here: a 16-token forward pass (what a step of 16 decode rows
  costs) is timed in both (the median of 5 after a warm-up). A CPU whose flags
  claim bf16 may still compute it slower than fp32 for a given model's shapes
  (oneDNN picks other kernels on a CPU without AMX).

Otherwise it reloads the model in fp32 (a cast back would not restore the
bits bf16 dropped) and says so in the log. Either way the result is logged
and shown in `/ready`'s body; an explicit `BAKEHOUSE_DTYPE` skips the check.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MIN_TOP1_AGREEMENT = 0.99
MAX_MEAN_KL = 0.01
MIN_SPEEDUP = 1.0  # bf16 is kept only when its step takes at most fp32's / MIN_SPEEDUP
TIMED_RUNS = 5

PASSAGE = (
    "The weights of a language model are stored as tensors in files that can be several gigabytes in size. "
    "Before a server loads them, it should check that every file is complete and that its bytes match the "
    "checksum recorded when the model was pinned. A model that was only partly downloaded can still load, and "
    "then it answers every question with text that looks plausible but is wrong. Operators who run models on "
    "many machines keep one copy of each file per machine, verify it once, and mount it read-only into the "
    "containers that serve it, so that nothing can change the weights while requests are being answered."
)


@dataclass(frozen=True)
class PrecisionCheck:
    """bf16 against fp32 on the passage: what decides the CPU default."""

    tokens: int
    top1_agreement: float
    mean_kl: float
    fp32_step_seconds: float | None = None  # a 16-token forward pass; None: not timed
    bf16_step_seconds: float | None = None

    @property
    def accurate(self) -> bool:
        return self.top1_agreement >= MIN_TOP1_AGREEMENT and self.mean_kl <= MAX_MEAN_KL

    @property
    def faster(self) -> bool:
        if self.fp32_step_seconds is None or self.bf16_step_seconds is None:
            return True
        return self.bf16_step_seconds * MIN_SPEEDUP <= self.fp32_step_seconds

    @property
    def passed(self) -> bool:
        return self.accurate and self.faster

    def describe(self) -> str:
        verdict = "bf16 kept" if self.passed else ("fp32 kept: bf16 is not faster here" if self.accurate else "fp32 kept")
        timed = ""
        if self.fp32_step_seconds is not None and self.bf16_step_seconds is not None:
            timed = f", a 16-token step {self.fp32_step_seconds * 1e3:.1f} ms in fp32 and {self.bf16_step_seconds * 1e3:.1f} ms in bf16"
        return (f"bf16 vs fp32 over {self.tokens} tokens: top-1 agreement {self.top1_agreement:.3f} (>= {MIN_TOP1_AGREEMENT}), "
                f"mean KL {self.mean_kl:.4f} nats (<= {MAX_MEAN_KL}){timed}: {verdict}")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (none where /proc/cpuinfo cannot be read)."""
    try:
        return set(next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), []))
    except OSError:
        return set()


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AVX-512 BF16 or AMX: the CPU computes bf16 itself (without them, bf16 is emulated and slower than fp32)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags(cpuinfo))


def median_seconds(run: Callable[[], object], runs: int = TIMED_RUNS) -> float:
    """The median time of `runs` calls after one warm-up: one slow call on a busy machine does not decide."""
    run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(logits: Callable[[], torch.Tensor], to_bf16: Callable[[], None], step: Callable[[], object] | None = None) -> PrecisionCheck:
    """`logits()` [positions, vocab] of the passage, before and after `to_bf16()`; `step` timed in both when given."""
    reference = torch.log_softmax(logits().float(), dim=-1)
    fp32 = median_seconds(step) if step else None
    to_bf16()
    low = torch.log_softmax(logits().float(), dim=-1)
    bf16 = median_seconds(step) if step else None
    agreement = (reference.argmax(-1) == low.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(low, reference, reduction="none", log_target=True).sum(-1).mean().item()
    return PrecisionCheck(len(reference), agreement, kl, fp32, bf16)
