"""BAKEHOUSE_ENGINE=vllm: vLLM serves the verified commit directory, as a supervised child behind bakehouse's contract.

Why a child process and not vLLM's engine in this one: vLLM brings its own
pinned stack (torch, transformers, fastapi) and its own process model (an
engine core, GPU workers); in one process it would fight the app's
dependencies and event loop, and a crash of either would take the other down.
As a child it runs from its own virtualenv (BAKEHOUSE_VLLM_PYTHON), started
only after the quick verify passed, on the commit directory only (offline,
never the hub), listening on a loopback port nothing else reaches. bakehouse
stays in front: /health is liveness, /ready is 200 once vLLM answers its own
/health, the OpenAI routes are forwarded (streams pass through; a client that
goes away closes the upstream request, which vLLM aborts), /metrics carries
bakehouse's and vLLM's. The cost is one loopback hop per request.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from ops.errors import ConfigError
from ops.runner import stop
from ops.settings import env_number

logger = logging.getLogger("bakehouse.vllm")
_START_TIMEOUT_S = 1800.0  # a large model's first start compiles and loads for minutes


@dataclass(frozen=True)
class VllmOptions:
    """vLLM engine arguments bakehouse passes through (others: BAKEHOUSE_VLLM_ARGS)."""

    python: str = sys.executable
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    quantization: str | None = None
    extra: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> VllmOptions:
        extra = tuple(shlex.split(os.environ.get("BAKEHOUSE_VLLM_ARGS", "")))
        owned = {"--model", "--served-model-name", "--host", "--port", "--dtype"}
        clash = [a for a in extra if a.split("=", 1)[0] in owned]
        if clash:
            raise ConfigError(f"BAKEHOUSE_VLLM_ARGS: {clash[0]!r} is set by bakehouse (the verified directory, the model name, the loopback port, BAKEHOUSE_DTYPE).")
        quantization = os.environ.get("BAKEHOUSE_VLLM_QUANTIZATION") or None
        if quantization is not None and not quantization.replace("_", "").isalnum():
            raise ConfigError(f"BAKEHOUSE_VLLM_QUANTIZATION={quantization!r}: a vLLM quantization method name (awq, gptq, fp8, …).")
        return cls(
            python=os.environ.get("BAKEHOUSE_VLLM_PYTHON") or sys.executable,
            tensor_parallel_size=int(env_number("BAKEHOUSE_VLLM_TENSOR_PARALLEL_SIZE", 1, maximum=64)),
            max_model_len=int(env_number("BAKEHOUSE_VLLM_MAX_MODEL_LEN", 0, minimum=0)) or None,
            gpu_memory_utilization=float(env_number("BAKEHOUSE_VLLM_GPU_MEMORY_UTILIZATION", 0, float, minimum=0, maximum=1)) or None,
            quantization=quantization,
            extra=extra,
        )


def vllm_argv(opts: VllmOptions, directory: Path, name: str, port: int, dtype: str) -> list[str]:
    """vLLM's OpenAI server on the verified directory, bound to loopback."""
    argv = [opts.python, "-m", "vllm.entrypoints.openai.api_server", f"--model={directory}", f"--served-model-name={name}",
            "--host=127.0.0.1", f"--port={port}", f"--dtype={dtype}", f"--tensor-parallel-size={opts.tensor_parallel_size}"]
    if opts.max_model_len:
        argv.append(f"--max-model-len={opts.max_model_len}")
    if opts.gpu_memory_utilization:
        argv.append(f"--gpu-memory-utilization={opts.gpu_memory_utilization:g}")
    if opts.quantization:
        argv.append(f"--quantization={opts.quantization}")
    return [*argv, *opts.extra]


def child_env() -> dict[str, str]:
    """The child never asks a hub: everything it loads is in the verified directory."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1"}


class VllmChild:
    """The vLLM server process: started, watched until it answers, stopped with the app."""

    def __init__(self, argv: Sequence[str], port: int, log: Path):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        logger.info("starting vLLM (log in %s): %s", log, shlex.join(argv))
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(list(argv), env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, alive: Callable[[], bool] = lambda: True, timeout: float = _START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive():
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode} while starting: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM did not answer within {timeout:.0f}s: {self.tail()}")

    def tail(self, lines: int = 8) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        stop(self.process, timeout=30)
