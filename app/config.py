"""The app's settings, from the environment (the container's interface)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ops.settings import default_lock, default_manifest, default_models_dir, env_flag, env_number


@dataclass(frozen=True)
class Settings:
    model: str
    models_dir: Path
    lock: Path
    manifest: Path
    host: str = "0.0.0.0"
    port: int = 8000
    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_tokens_limit: int = 512
    allow_pickle: bool = False

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "model": os.environ.get("MODEL") or "demo",
            "models_dir": default_models_dir(),
            "lock": default_lock(),
            "manifest": default_manifest(),
            "host": os.environ.get("HOST") or "0.0.0.0",
            "port": env_number("PORT", 8000, maximum=65535),
            "max_batch": env_number("BAKEHOUSE_MAX_BATCH", 16),
            "max_wait_ms": env_number("BAKEHOUSE_MAX_WAIT_MS", 10, float),
            "max_tokens_limit": env_number("BAKEHOUSE_MAX_TOKENS", 512),
            "allow_pickle": env_flag("BAKEHOUSE_ALLOW_PICKLE", False),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
