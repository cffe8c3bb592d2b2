"""The engine-client interface: what the HTTP routes ask of an engine, whichever runs behind it.

Like vLLM's `EngineClient` under its `serving_*` modules, one interface with
two implementations: `app.local.LocalClient` (transformers in this process,
with bakehouse's scheduler) and `app.vllm_engine.VllmClient` (vLLM as a
supervised child). The routes (app.server) check readiness and the model name,
then hand the validated request to the client; each client answers in the
OpenAI shapes (app.replies), so a user sees one contract.
"""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response

from app.config import EngineName, Settings
from app.loader import Verified
from app.metrics import Metrics
from app.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest


class EngineClient(Protocol):
    name: EngineName

    def start(self, verified: Verified) -> None:
        """Load the verified directory and make it ready to serve (called inside the store's read hold; raises when it cannot)."""

    def describe(self) -> dict[str, Any]:
        """What /ready and /v1/models add once loaded (dtype, precision check, context length)."""

    async def completions(self, body: CompletionRequest, request: Request) -> Response: ...
    async def chat(self, body: ChatRequest, request: Request) -> Response: ...
    async def tokenize(self, body: TokenizeRequest, request: Request) -> Response: ...
    async def detokenize(self, body: DetokenizeRequest, request: Request) -> Response: ...

    async def prometheus(self) -> bytes:
        """The engine's own Prometheus text, appended to the app's."""

    @property
    def busy(self) -> int:
        """Requests (sequences) waiting or running: what a drain waits for."""

    def stop(self) -> None:
        """Stop generating and release the engine (the app is shutting down)."""


def engine_client(settings: Settings, metrics: Metrics) -> EngineClient:
    """The client for BAKEHOUSE_ENGINE; each imports its engine only when chosen."""
    if settings.engine == "vllm":
        from app.vllm_engine import VllmClient

        return VllmClient(settings, metrics)
    from app.local import LocalClient

    return LocalClient(settings, metrics)
