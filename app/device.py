"""Where and in which dtype the model runs: CUDA when present, else the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.precision import cpu_has_native_bf16


@dataclass(frozen=True)
class DevicePlan:
    device: str
    dtype: torch.dtype
    try_bf16: bool = False  # load as `dtype` (fp32), then keep bf16 if the model passes app.precision's check


def pick_device(cuda_available: bool, bf16_supported: bool, cpu_bf16: bool = False) -> DevicePlan:
    """CUDA in bf16 where supported, else fp16; CPU in fp32, or bf16 after a quality check where the CPU computes bf16 natively."""
    if cuda_available:
        return DevicePlan("cuda", torch.bfloat16 if bf16_supported else torch.float16)
    return DevicePlan("cpu", torch.float32, try_bf16=cpu_bf16)


def device_plan(dtype: str = "auto") -> DevicePlan:
    """This machine's plan; an explicit dtype (BAKEHOUSE_DTYPE) replaces the automatic choice and its check."""
    cuda = torch.cuda.is_available()
    plan = pick_device(cuda, cuda and torch.cuda.is_bf16_supported(), cpu_has_native_bf16())
    return plan if dtype == "auto" else DevicePlan(plan.device, getattr(torch, dtype))
