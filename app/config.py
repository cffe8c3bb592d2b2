"""The app's settings, from the environment (the container's interface)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from app.device import DevicePlan, device_plan
from ops.settings import choice, default_lock, default_manifest, default_models_dir, env_flag, env_number

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[Dtype, ...] = ("auto", "float32", "bfloat16", "float16")
EngineName = Literal["transformers", "vllm"]
ENGINES: tuple[EngineName, ...] = ("transformers", "vllm")


@dataclass(frozen=True)
class Settings:
    model: str
    models_dir: Path
    lock: Path
    manifest: Path
    host: str = "0.0.0.0"
    port: int = 8000
    max_batch: int = 32  # running requests (rows) at once
    step_tokens: int = 512  # tokens one forward pass may process: one per running row, the rest for chunks of waiting prompts
    max_queue: int = 256  # sequences waiting for a row; more is 429 with Retry-After
    max_tokens_limit: int = 512
    max_body_bytes: int = 4 << 20  # a larger request body is 413, refused before it is read whole
    max_prompt_chars: int = 200_000  # checked before tokenizing
    max_choices: int = 64  # prompts x n in one request
    dtype: Dtype = "auto"
    engine: EngineName = "transformers"
    allow_pickle: bool = False
    kv_cache_gb: float | None = None  # the KV cache's budget (BAKEHOUSE_KV_CACHE_GB); None: half the free GPU memory, or a quarter of RAM
    compile_kernels: bool = True  # after ready, compile a decode kernel in the background and adopt it if faster (app.tuning)
    drain_seconds: float = 30.0  # on SIGTERM: how long running requests and streams may take to finish
    deregister_seconds: float = 1.0  # on SIGTERM: how long new requests are still taken while the front proxy takes the instance out

    def device_plan(self) -> DevicePlan:
        return device_plan(self.dtype)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """The environment's settings; `overrides` that are not None win (the CLI's --model, --port)."""
        env = os.environ
        settings = cls(
            model=env.get("MODEL") or "demo",
            models_dir=default_models_dir(),
            lock=default_lock(),
            manifest=default_manifest(),
            host=env.get("HOST") or "0.0.0.0",
            port=int(env_number("PORT", 8000, maximum=65535)),
            max_batch=int(env_number("BAKEHOUSE_MAX_BATCH", cls.max_batch, maximum=1024)),
            step_tokens=int(env_number("BAKEHOUSE_STEP_TOKENS", cls.step_tokens, minimum=32)),
            max_queue=int(env_number("BAKEHOUSE_MAX_QUEUE", cls.max_queue)),
            max_tokens_limit=int(env_number("BAKEHOUSE_MAX_TOKENS", cls.max_tokens_limit)),
            max_body_bytes=int(env_number("BAKEHOUSE_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024)),
            max_prompt_chars=int(env_number("BAKEHOUSE_MAX_PROMPT_CHARS", cls.max_prompt_chars)),
            max_choices=int(env_number("BAKEHOUSE_MAX_CHOICES", cls.max_choices)),
            dtype=choice("BAKEHOUSE_DTYPE", env.get("BAKEHOUSE_DTYPE") or None, DTYPES, default="auto"),
            engine=choice("BAKEHOUSE_ENGINE", env.get("BAKEHOUSE_ENGINE") or None, ENGINES, default="transformers"),
            allow_pickle=env_flag("BAKEHOUSE_ALLOW_PICKLE", False),
            compile_kernels=env_flag("BAKEHOUSE_COMPILE", True),
            kv_cache_gb=float(env_number("BAKEHOUSE_KV_CACHE_GB", 0, float, minimum=0.01, maximum=1e6)) if env.get("BAKEHOUSE_KV_CACHE_GB") else None,
            drain_seconds=float(env_number("BAKEHOUSE_DRAIN_SECONDS", cls.drain_seconds, float, minimum=0, maximum=86400)),
            deregister_seconds=float(env_number("BAKEHOUSE_DEREGISTER_SECONDS", cls.deregister_seconds, float, minimum=0, maximum=60)),
        )
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]  # the CLI's overrides are checked there
