"""API keys: `Authorization: Bearer <key>` on the OpenAI routes and /metrics, as vLLM's --api-key and OpenAI's own API.

    BAKEHOUSE_API_KEY        one key
    BAKEHOUSE_API_KEY_FILE   one key per line (# comments); re-read when the file changes, so keys rotate without a restart
    BAKEHOUSE_METRICS_OPEN=1 /metrics without a key (a Prometheus on a trusted network)

With neither key set, the API is open (a warning at start says so, unless it
listens on loopback only). /health and /ready are always open: a load
balancer's checks carry no key, and neither answer says anything secret. Keys
are compared in constant time, against every key, and never logged; a request
without a valid key is 401 in the OpenAI error shape.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from app.middleware import send_error
from ops.errors import ApiError, ConfigError
from ops.settings import env_flag

log = logging.getLogger("bakehouse.auth")
PROTECTED = ("/v1/", "/tokenize", "/detokenize")
MIN_KEY_LENGTH = 16


def check_key(key: str, where: str) -> str:
    if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key) or not key.isprintable():
        raise ConfigError(f"{where}: an API key is at least {MIN_KEY_LENGTH} printable characters without spaces. "
                          "Make one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`.")
    return key


@dataclass
class ApiKeys:
    key: str | None = None
    file: Path | None = None
    metrics_open: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._from_file: tuple[str, ...] = ()
        if self.key is not None:
            check_key(self.key, "BAKEHOUSE_API_KEY")
        if self.file is not None:
            self._reload()

    @classmethod
    def from_env(cls) -> ApiKeys:
        file = os.environ.get("BAKEHOUSE_API_KEY_FILE") or None
        return cls(os.environ.get("BAKEHOUSE_API_KEY") or None, Path(file) if file else None, env_flag("BAKEHOUSE_METRICS_OPEN", False))

    @property
    def required(self) -> bool:
        return self.key is not None or self.file is not None

    def keys(self) -> tuple[str, ...]:
        if self.file is not None:
            self._reload()
        return ((self.key,) if self.key else ()) + self._from_file

    def _reload(self) -> None:
        """Read the key file again if it changed since the last read; a file that became unreadable keeps the last keys (and says so)."""
        assert self.file is not None
        try:
            st = self.file.stat()
        except OSError as exc:
            if self._stamp is None:
                raise ConfigError(f"BAKEHOUSE_API_KEY_FILE={self.file}: cannot be read ({exc.strerror}). Point it at a file of keys, one per line.") from exc
            log.warning("the API key file %s cannot be read (%s); keeping the keys read last", self.file, exc.strerror)
            return
        stamp = (st.st_mtime_ns, st.st_ino)
        with self._lock:
            if stamp == self._stamp:
                return
            if st.st_mode & 0o077:
                log.warning("the API key file %s can be read by other users (mode %o); chmod 600 it", self.file, st.st_mode & 0o777)
            lines = [line.strip() for line in self.file.read_text(encoding="utf-8", errors="strict").splitlines()]
            self._from_file = tuple(check_key(line, str(self.file)) for line in lines if line and not line.startswith("#"))
            self._stamp = stamp
            log.info("API keys: %d from %s", len(self._from_file), self.file)

    def allows(self, presented: str) -> bool:
        """Constant time: every key is compared, whatever matched before it."""
        match = False
        for key in self.keys():
            match |= hmac.compare_digest(presented.encode(), key.encode())
        return match


class RequireKey:
    """ASGI middleware: the OpenAI routes (and /metrics, unless open) need `Authorization: Bearer <key>` when keys are configured."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    def _protected(self, path: str) -> bool:
        return path.startswith(PROTECTED) or (path == "/metrics" and not self.keys.metrics_open)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.required or not self._protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented or not self.keys.allows(presented.strip()):
            error = ApiError(401, "a valid API key is required: send `Authorization: Bearer <key>` (the OpenAI clients' api_key).",
                             type_="invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await send_error(error, scope, send)
            return
        await self.app(scope, receive, send)
