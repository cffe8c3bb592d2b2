"""Settings: where models.toml, models.lock and the store are, and how a flag or an environment value is read.

Every value that comes from a flag or the environment is parsed here, at the
boundary, into the type its user needs; a bad value is a ConfigError (exit 2)
naming the flag or variable, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

from ops.errors import ConfigError, redact

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def default_manifest() -> Path:
    return Path(os.environ.get("BAKEHOUSE_MANIFEST") or "models.toml")


def default_lock() -> Path:
    return Path(os.environ.get("BAKEHOUSE_LOCK") or "models.lock")


def default_models_dir() -> Path:
    return Path(os.environ.get("MODELS_DIR") or "models")


def check_store_dir(path: Path, label: str) -> None:
    """The store is a directory (or not there yet): a regular file there is a usage error, not a traceback later."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{label} {path}: is a file, not a directory. Point {label} at the model store (a directory; it is created if missing).")


def check_endpoint() -> None:
    """HF_ENDPOINT, when set, is an http(s) URL with a valid host and port: the hub client would fail on it deep inside, with a traceback."""
    value = os.environ.get("HF_ENDPOINT")
    if not value:
        return
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"HF_ENDPOINT={redact(value)!r} is not a valid URL ({exc}). Set it to the hub's address, e.g. https://huggingface.co.") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or (port is not None and port == 0):
        raise ConfigError(f"HF_ENDPOINT={redact(value)!r} is not an http(s) URL with a host. Set it to the hub's address, e.g. https://huggingface.co.")


def names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """A comma-separated list of names (models, hosts); empty when none."""
    parts = value.split(",") if isinstance(value, str) else (value or ())
    return tuple(n.strip() for n in parts if n.strip())


def number(label: str, value: object, *, default: float, kind: type[int] | type[float] = int, minimum: float | None = None, maximum: float | None = None,
           hint: str = "Fix it and re-run.") -> int | float:
    """A whole or decimal number from a flag or variable (`label` names it): above zero, or inside [minimum, maximum]."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return kind(default)
    try:
        parsed = kind(str(value)) if not isinstance(value, bool) else None
    except (TypeError, ValueError, OverflowError):
        parsed = None
    if parsed is None or (isinstance(parsed, float) and not math.isfinite(parsed)):
        raise ConfigError(f"{label}={value!r} is not a {'whole ' if kind is int else ''}number. {hint}")
    if (parsed <= 0) if minimum is None else (parsed < minimum):
        raise ConfigError(f"{label}={value!r} must be {'above zero' if minimum is None else f'at least {minimum:g}'}. {hint}")
    if maximum is not None and parsed > maximum:
        raise ConfigError(f"{label}={value!r} must be at most {maximum:g}. {hint}")
    return parsed


C = TypeVar("C", bound=str)


def choice(label: str, value: str | None, choices: Sequence[C], *, default: C | None = None) -> C:
    """One of a closed set of options (a Literal type's values), typed as that Literal."""
    picked = default if value is None else value
    for option in choices:
        if option == picked:
            return option
    raise ConfigError(f"{label}={picked!r}: use one of {', '.join(choices)}.")


def flag(label: str, value: str | None, *, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE | _FALSE:
        return lowered in _TRUE
    raise ConfigError(f"{label}={value!r} is not a yes/no value: use 1 or 0.")


def env_number(name: str, default: float, kind: type[int] | type[float] = int, *, minimum: float | None = None, maximum: float | None = None,
               env: Mapping[str, str] | None = None) -> int | float:
    """A numeric setting; a bad value stops with the variable's name, not a traceback."""
    return number(name, (env if env is not None else os.environ).get(name), default=default, kind=kind, minimum=minimum, maximum=maximum,
                  hint="Fix it in the environment (or the host's app_env) and restart.")


def env_flag(name: str, default: bool, *, env: Mapping[str, str] | None = None) -> bool:
    return flag(name, (env if env is not None else os.environ).get(name), default=default)


def progress_seconds() -> float:
    """How often progress lines are logged when not on a terminal."""
    return float(env_number("BAKEHOUSE_PROGRESS_SECONDS", 5.0, float))


def read_text(path: Path, error: type[ConfigError], what: str, hint: str) -> str:
    """A config file's text; any reason it cannot be read is `error` naming the path, then `hint`."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise error(f"{path}: not found. {hint}") from exc
    except IsADirectoryError as exc:
        raise error(f"{path}: is a directory, not {what}. {hint}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: is not UTF-8 text (byte {exc.start}: {exc.reason}); {what} is a UTF-8 text file. {hint}") from exc
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror}). {hint}") from exc


# What a model command takes on stdin with --env-stdin: settings that may hold secrets (a token, an
# endpoint with credentials in it) reach a remote host this way, never through its argv or environment.
STDIN_ENV = ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY", "BAKEHOUSE_PROGRESS_SECONDS",
             "BAKEHOUSE_PEER_TOKEN")


def env_lines(env: Mapping[str, str]) -> str:
    """KEY=VALUE lines, then a blank line: the --env-stdin format."""
    for key, value in env.items():
        if key not in STDIN_ENV:
            raise ConfigError(f"{key} cannot be passed on stdin; only {', '.join(STDIN_ENV)}.")
        if any(c in value for c in "\r\n\0"):
            raise ConfigError(f"{key} holds a line break or a NUL; fix the variable and re-run.")
    return "".join(f"{k}={v}\n" for k, v in env.items() if v) + "\n"


def read_env_lines(stream: TextIO) -> dict[str, str]:
    """Read --env-stdin lines up to a blank line (or the end); an unknown or malformed line is a ConfigError."""
    env: dict[str, str] = {}
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        if not line:
            break
        key, sep, value = line.partition("=")
        if not sep or key not in STDIN_ENV:
            raise ConfigError(f"--env-stdin: {key[:40]!r} is not one of {', '.join(STDIN_ENV)} (KEY=VALUE lines, then a blank line).")
        env[key] = value
    return env


def _redacted_record_factory(make: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """Records made without credentials or tokens (the hub client logs whole URLs): the message, and any traceback or stack
    rendered now, redacted, so every handler prints the redacted text whatever its formatter."""

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        with contextlib.suppress(TypeError, ValueError):  # a malformed call is logging's to report, at emit time
            message = record.getMessage()
            if (redacted := redact(message)) != message:
                # Only then: formatters may read the arguments themselves (uvicorn's access log builds its line from them).
                record.msg, record.args = redacted, None
        if record.exc_info:
            record.exc_text = redact(_TRACEBACKS.formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    factory.redacts = True  # type: ignore[attr-defined]
    return factory


_TRACEBACKS = logging.Formatter()


def configure_logging() -> None:
    """Progress and step lines on stderr; reports on stdout. The HTTP and SSH clients' per-request lines are noise here.

    Every record is redacted when it is made, not when a handler formats it: libraries bring handlers of their own, some
    only when imported (the hub client is imported only when a hub source is fetched).
    """
    if not getattr(logging.getLogRecordFactory(), "redacts", False):
        logging.setLogRecordFactory(_redacted_record_factory(logging.getLogRecordFactory()))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "huggingface_hub", "paramiko"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
