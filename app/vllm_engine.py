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

import asyncio
import collections
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from app.config import EngineName, Settings
from app.loader import Verified
from app.metrics import Metrics
from app.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from ops.errors import ApiError, ConfigError, NotServableError, redact
from ops.net import free_port
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
        owned = {"--model", "--served-model-name", "--host", "--port", "--dtype", "--api-key"}
        clash = [a for a in extra if a.split("=", 1)[0] in owned]
        if clash:
            raise ConfigError(f"BAKEHOUSE_VLLM_ARGS: {clash[0].split('=', 1)[0]!r} is set by bakehouse (the verified directory, the model name, the loopback port, "
                              "BAKEHOUSE_DTYPE; API keys: BAKEHOUSE_API_KEY, checked in front of vLLM).")
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


SECRET_ENV = ("BAKEHOUSE_API_KEY", "BAKEHOUSE_API_KEY_FILE", "HF_TOKEN", "VLLM_API_KEY")


def child_env() -> dict[str, str]:
    """The child never asks a hub (everything it loads is in the verified directory), and gets none of the app's secrets."""
    inherited = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    return {**inherited, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


class VllmChild:
    """The vLLM server process: started, watched until it answers, stopped with the app.

    Its output goes line by line into this app's log (redacted like every record),
    not into a file: nothing of it is left on disk, and the last lines are kept to
    say why a start failed.
    """

    def __init__(self, argv: Sequence[str], port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.last: collections.deque[str] = collections.deque(maxlen=8)
        logger.info("starting vLLM: %s", redact(shlex.join(argv)))
        self.process = subprocess.Popen(list(argv), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._relay, name="vllm-log", daemon=True).start()

    def _relay(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.last.append(line)
            logger.info("vllm: %s", line)

    def wait_ready(self, alive: Callable[[], bool] = lambda: True, timeout: float = _START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive():
            if self.process.poll() is not None:
                self._log_tail()
                raise RuntimeError(f"vLLM exited with {self.process.returncode} while starting; its last lines are in this app's log")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self._log_tail()
        raise RuntimeError(f"vLLM did not answer within {timeout:.0f}s; its last lines are in this app's log")

    def _log_tail(self) -> None:
        for line in list(self.last):
            logger.error("vllm (last lines): %s", line)

    def stop(self) -> None:
        stop(self.process, timeout=30)


class VllmClient:
    """The engine-client interface over the vLLM child: requests validated here, then forwarded as they came."""

    name: EngineName = "vllm"

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.child: VllmChild | None = None
        self.stopping = False
        self.in_flight = 0
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10))

    def start(self, verified: Verified) -> None:
        options = VllmOptions.from_env()
        if not verified.safetensors_only:
            raise NotServableError(f"{self.settings.model}: the vLLM engine loads safetensors only; convert the weights, or use BAKEHOUSE_ENGINE=transformers.")
        t0 = time.monotonic()
        port = free_port()
        dtype = "auto" if self.settings.dtype == "auto" else self.settings.dtype
        self.child = VllmChild(vllm_argv(options, verified.directory, self.settings.model, port, dtype), port)
        self.child.wait_ready(alive=lambda: not self.stopping)
        self.metrics.load_seconds.set(time.monotonic() - t0)

    def describe(self) -> dict[str, Any]:
        return {}

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._forward(request)

    async def chat(self, body: ChatRequest, request: Request) -> Response:
        return await self._forward(request)

    async def tokenize(self, body: TokenizeRequest, request: Request) -> Response:
        return await self._forward(request)

    async def detokenize(self, body: DetokenizeRequest, request: Request) -> Response:
        return await self._forward(request)

    async def _forward(self, request: Request) -> Response:
        """The request's own bytes to vLLM; a stream passes through as it comes, and a client that goes away closes the upstream request."""
        assert self.child is not None  # the routes answer 503 until start() returned
        self.in_flight += 1
        try:
            upstream = self.http.build_request("POST", self.child.url + request.url.path, content=await request.body(),
                                               headers={"content-type": request.headers.get("content-type", "application/json")})
            response = await self.http.send(upstream, stream=True)
        except BaseException:
            self.in_flight -= 1
            raise
        media = response.headers.get("content-type", "application/json")
        if media.startswith("text/event-stream"):
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                finally:
                    await response.aclose()
                    self.in_flight -= 1

            return StreamingResponse(relay(), status_code=response.status_code, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            reading = asyncio.create_task(response.aread())
            while not reading.done():
                if await request.is_disconnected():
                    reading.cancel()
                    raise ApiError(499, "the client went away", code="client_closed")
                await asyncio.wait([reading], timeout=0.5)
            return Response(reading.result(), status_code=response.status_code, media_type=media)
        finally:
            await response.aclose()
            self.in_flight -= 1

    async def prometheus(self) -> bytes:
        if self.child is None:
            return b""
        try:
            return (await self.http.get(f"{self.child.url}/metrics", timeout=5)).content
        except httpx.HTTPError as exc:
            logger.warning("vLLM's /metrics did not answer: %s", redact(str(exc)))
            return b""

    @property
    def busy(self) -> int:
        return self.in_flight

    def stop(self) -> None:
        self.stopping = True
        if self.child is not None:
            self.child.stop()
