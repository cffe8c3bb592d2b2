"""After ready: the compiled decode kernel (app.kvcache, `compiled`), made and timed in the background, adopted when it wins.

Compiling a kernel takes seconds (tens on a cold inductor cache), so the
server is ready first, with the kernel chosen at load; then one thread
compiles `upcast_attention` for the decode shapes the scheduler passes
(one row or several), checks its
output against the eager sums, and times it against the kernel in use at two
batch shapes, interleaved, the median of 9 runs each, each run over another
layer's keys and values (as a step reads them: not from the CPU's cache). A
kernel faster over both shapes and not more than 15 % slower at either is
adopted: the scheduler switches between two steps, the cache's keys and
values converted to the model's dtype. From then on a shape the kernel was
not compiled for runs those layers eager rather than stalling a step for a
compile.

Where torch cannot compile (no C++ compiler in the image, a read-only /tmp for
its cache) the kernel chosen at load stays, and `/ready` says why.
`BAKEHOUSE_COMPILE=0` skips all of it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Literal

import torch

from app.kvcache import DecodeChoice, Shape, decode_attention, decode_inputs, upcast_attention
from app.seats import COLUMNS

log = logging.getLogger("bakehouse.tuning")

State = Literal["off", "compiling", "adopted", "kept", "failed"]
SHAPES = ((8, 256), (32, 512))  # (decode rows, columns) the kernels are timed at
RUNS = 9
LAST_LEVEL_CACHE = 64 << 20  # bytes the timed keys and values span at least (an EPYC's L3 is 32 MiB per chiplet)
SLOWER_AT_MOST = 1.15  # adopted when faster over all shapes and no shape more than this much slower (a small shape's timing is noise)


@dataclass(frozen=True)
class Tuning:
    """Where the background kernel tuning stands, for `/ready` and the log."""

    state: State
    detail: str = ""

    def describe(self) -> str:
        return f"{self.state}: {self.detail}" if self.detail else self.state


def compile_kernel(shape: Shape) -> None:
    """Compile through the call the scheduler makes, for each kind of step torch tells apart (a tier of one row or more, one decode
    row or more: it specializes a size of 1; the longest row filling its tier's columns or not), and check the output against the
    eager sums (ValueError if it differs)."""
    with torch.inference_mode(), torch.compiler.set_stance("default"):  # compiling is what this is for, whatever an earlier tuning set
        for (capacity, rows), columns in itertools.product(((1, 1), (3, 1), (3, 2), (8, 5)), (None, 40)):
            q, k, v, mask = decode_inputs(shape, shape.dtype, rows, 40, seed=rows, capacity=capacity, columns=columns)
            got, want = decode_attention("compiled", q, k, v, mask, shape.dim**-0.5), upcast_attention(q, k, v, mask, shape.dim**-0.5)
            if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-3):
                raise ValueError(f"the compiled kernel's output differs from the eager one by {(got.float() - want.float()).abs().max():.3g}")


def time_kernels(shape: Shape, choices: tuple[DecodeChoice, DecodeChoice], rows: int, width: int) -> tuple[float, float]:
    """The median seconds of each choice at one shape, their runs interleaved so a busy spell of the machine falls on both.

    Each run reads another layer's keys and values, from a set larger than a CPU's last-level cache, as a step does: one buffer
    read again and again would be timed from the cache, where reading fewer bytes (the point of a bf16 cache) shows no gain.
    """
    kv_bytes = 2 * rows * shape.kv_heads * (width + COLUMNS) * shape.dim * 4
    layers = max(1, min(8, -(-LAST_LEVEL_CACHE // kv_bytes)))
    times: list[list[float]] = [[], []]
    with torch.inference_mode():
        calls = [[functools.partial(decode_attention, choice.kernel, *decode_inputs(shape, choice.kv_dtype or shape.dtype, rows, width, seed=layer), shape.dim**-0.5)
                  for layer in range(layers)] for choice in choices]
        for layer_calls in calls:
            for call in layer_calls:
                call()
        for run in range(RUNS * layers):
            for i, layer_calls in enumerate(calls):
                start = time.perf_counter()
                layer_calls[run % layers]()
                times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def tune(shape: Shape, current: DecodeChoice) -> tuple[DecodeChoice | None, Tuning]:
    """The compiled kernel if it is faster than `current` (over both timed shapes, and not much slower at either; None otherwise),
    and what was found."""
    candidate = DecodeChoice("compiled")
    start = time.monotonic()
    try:
        compile_kernel(shape)
        compiled_in = time.monotonic() - start
        timed = [(rows, width, *time_kernels(shape, (candidate, current), rows, width)) for rows, width in SHAPES]
    except Exception as exc:  # inductor's failures are many (no compiler, no writable cache, an unsupported op): the chosen kernel stays
        log.debug("compiling the decode kernel failed", exc_info=True)
        first = next(iter(str(exc).splitlines()), "")[:200]
        return None, Tuning("failed", f"torch.compile failed ({type(exc).__name__}: {first}); kept {current.describe()}")
    report = "; ".join(f"{rows} rows x {width} columns: {new * 1e3:.2f} ms vs {old * 1e3:.2f} ms" for rows, width, new, old in timed)
    if sum(new for _, _, new, _ in timed) < sum(old for _, _, _, old in timed) and all(new <= old * SLOWER_AT_MOST for _, _, new, old in timed):
        torch.compiler.set_stance("eager_on_recompile")  # a shape not compiled for runs eager instead of stalling a step to compile
        return candidate, Tuning("adopted", f"compiled kernel, {str(shape.dtype).removeprefix('torch.')} cache, in {compiled_in:.1f}s; "
                                            f"against {current.describe()}: {report}")
    return None, Tuning("kept", f"{current.describe()}: the compiled kernel is not faster here ({report})")
