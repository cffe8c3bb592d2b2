"""Linear layers with their weights packed once for oneDNN, on CPU, where that is faster.

`F.linear` in bf16 on CPU reorders the weight for oneDNN on every call and,
for the few rows of a decode step, reads it at about half the memory
bandwidth fp32 gets. Packing each weight once at load (the kernel
`torch.compile` uses for frozen CPU models, without compiling) makes a
decode step's matmuls 10-30 % faster on an AMX CPU (134 M Llama: 768x3072 at
8 rows, 339 -> 211 us; 3072x768, 219 -> 188 us), and on an AMD EPYC 1.3-2.4x
faster in bf16 and 1.3-1.8x in fp32 (768x3072 at 8 rows: 607 -> 342 us in
fp32). Whether it pays depends on the CPU and its BLAS, so the engine times
one of the model's own layers both ways at load (the median of 7) and packs
only when packed is faster. It is PyTorch's private oneDNN op, so the engine
also checks it against `F.linear` and keeps the plain layers when it is
missing or disagrees. The output layer stays as it is: it is often tied to
the input embeddings, and a packed copy would double that matrix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from app.precision import median_seconds

log = logging.getLogger("bakehouse.packed")


class PackedLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packing_works(dtype: torch.dtype) -> bool:
    """The op exists in this PyTorch and gives F.linear's result (to bf16's precision) at decode and prompt shapes."""
    try:
        g = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(64, 96, bias=True).to(dtype)
        packed = PackedLinear(linear)
        with torch.inference_mode():
            for rows in (1, 8, 100):
                x = torch.randn(1, rows, 64, generator=g).to(dtype)
                torch.testing.assert_close(packed(x).float(), linear(x).float(), atol=0.05, rtol=0.02)
    except (AttributeError, RuntimeError, AssertionError) as exc:
        log.info("packed linear layers unavailable (%s: %s); plain ones kept", type(exc).__name__, exc)
        return False
    return True


@dataclass
class Pending:
    """The linear layers still to pack. Packing takes about a second a GB of weights, so the engine does it after it is ready,
    a few layers at a time between steps (app.scheduler): a model serves at once, plain, and gets faster as it goes."""

    layers: list[tuple[torch.nn.Module, str, torch.nn.Linear]] = field(default_factory=list)
    packed: int = 0

    def pack(self, seconds: float) -> int:
        """Pack layers for about `seconds` (at least one); how many are left."""
        deadline = time.monotonic() + seconds
        while self.layers:
            parent, name, linear = self.layers.pop()
            setattr(parent, name, PackedLinear(linear))
            self.packed += 1
            if time.monotonic() > deadline:
                break
        return len(self.layers)


def linears_to_pack(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> Pending:
    """The model's linear layers but its output layer, to pack: on CPU, where the op works and is faster for this model's layers."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32) or not packing_works(dtype):
        return Pending()
    output = getattr(model, "get_output_embeddings", lambda: None)()
    layers = [(module, name, child) for module in model.modules() for name, child in module.named_children()
              if type(child) is torch.nn.Linear and child is not output]
    if not layers or not packing_pays(max((child for _, _, child in layers), key=lambda c: c.weight.numel()), dtype):
        return Pending()
    return Pending(layers)


def packing_pays(linear: torch.nn.Linear, dtype: torch.dtype, rows: int = 8) -> bool:
    """Is the packed layer faster than the plain one for a decode step of `rows` rows (the median of 7 each)?"""
    x = torch.randn(1, rows, linear.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        plain_s = median_seconds(lambda: linear(x), runs=7)
        packed_s = median_seconds(lambda: packed(x), runs=7)
    log.info("packed linear layers (%s): %.0f us against %.0f us plain for %d rows of %dx%d: %s", str(dtype).removeprefix("torch."),
             packed_s * 1e6, plain_s * 1e6, rows, linear.in_features, linear.out_features, "packed" if packed_s < plain_s else "kept plain")
    return packed_s < plain_s


def pack_linears(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Pack every one of them now; how many were packed."""
    pending = linears_to_pack(model, dtype, device)
    pending.pack(float("inf"))
    return pending.packed
