"""The app's settings, from the environment (the container's interface)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ops.errors import ConfigError
from ops.models.cli import default_lock, default_manifest
from ops.models.store import default_models_dir

_TRUE = {"1", "true", "yes", "on"}


def env_number(name: str, default: float, kind: type = int) -> float:
    """A numeric setting; a bad value stops the app with the variable's name, not a traceback."""
    value = os.environ.get(name) or ""
    if not value.strip():
        return kind(default)
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a {'whole ' if kind is int else ''}number. Fix it in the environment (or the host's app_env) and restart.") from None
    if number <= 0:
        raise ConfigError(f"{name}={value!r} must be above zero.")
    return number


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None or value == "" else value.strip().lower() in _TRUE


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
            "port": env_number("PORT", 8000),
            "max_batch": env_number("BAKEHOUSE_MAX_BATCH", 16),
            "max_wait_ms": env_number("BAKEHOUSE_MAX_WAIT_MS", 10, float),
            "max_tokens_limit": env_number("BAKEHOUSE_MAX_TOKENS", 512),
            "allow_pickle": env_flag("BAKEHOUSE_ALLOW_PICKLE", False),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
