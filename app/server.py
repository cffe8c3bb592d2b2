"""The HTTP API: routes only. /health, /ready, /v1/models and /metrics here; the OpenAI routes hand their validated body to the engine client.

Limits come before work: a body over BAKEHOUSE_MAX_BODY_BYTES is 413 before
it is read whole (app.middleware); the engine client checks the rest before
tokenizing (app.schemas); a full queue is 429 with Retry-After, and a client
that goes away cancels its generation. /health answers whatever a request does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth import ApiKeys, RequireKey
from app.client import EngineClient, engine_client
from app.config import Settings
from app.drain import Drain, DrainGate
from app.loader import LoadState, load
from app.metrics import Metrics
from app.middleware import BodyLimit, CountRequests, error_response
from app.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, validation_error
from ops.errors import ApiError

M = TypeVar("M", bound=BaseModel)


async def parsed(request: Request, model: type[M]) -> M:
    """The request's JSON body as `model`, parsed and validated in a worker thread; 400 in the OpenAI shape when it is not one."""
    raw = await request.body()
    return await asyncio.to_thread(_validate, raw, model)


def _validate(raw: bytes, model: type[M]) -> M:
    # json.loads, as FastAPI parses bodies: a lone surrogate gets its own clear 400 from the checks, not a parser's riddle
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({str(exc)[:200]}); send UTF-8 JSON.", code="invalid_json") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def begin_drain(app: FastAPI, stop: Callable[[], None]) -> None:
    """SIGTERM: /ready 503 now, then the drain (app.drain) in its own thread, and `stop` the server at its end."""
    state: LoadState = app.state.bakehouse
    was_ready = state.ready
    state.set("draining", "draining: this instance is stopping (a deploy or a restart)")
    threading.Thread(target=app.state.drain.run, args=(was_ready, stop), name="drain", daemon=True).start()


def create_app(settings: Settings, keys: ApiKeys | None = None) -> FastAPI:
    state, metrics = LoadState(), Metrics()
    keys = keys or ApiKeys()
    drain = Drain(deregister=settings.deregister_seconds, seconds=settings.drain_seconds)
    client = engine_client(settings, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, args=(settings, state, metrics, client.start), kwargs={"engine": client.name}, name="loader", daemon=True).start()
        yield
        state.stopping = True
        client.stop()

    app = FastAPI(title="bakehouse", lifespan=lifespan)
    app.state.bakehouse = state
    app.state.drain = drain
    app.add_middleware(DrainGate, drain=drain)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequireKey, keys=keys)  # before the body is read: a caller without a key costs nothing
    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        metrics.errors.labels(exc.type).inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not decode the body at all
            return await api_error(request, ApiError(400, f"the request body is not valid JSON ({exc.detail}); send UTF-8 JSON.", code="invalid_json"))
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return await api_error(request, ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}.", type_=kind))

    def serving(model: str) -> EngineClient:
        if not state.serving:
            raise ApiError(503, f"the model is not ready: {state.reason}. Poll GET /ready and retry.", type_="service_unavailable", code="not_ready")
        if model != settings.model:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {settings.model!r} (GET /v1/models).", param="model",
                           code="model_not_found")
        return client

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": settings.model, "state": state.status}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body: dict[str, object] = {"ready": state.ready, "model": settings.model, "engine": client.name, "state": state.status, "reason": state.reason}
        if state.ready:
            body |= client.describe()
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        text = generate_latest(metrics.registry) + (await client.prometheus() if state.ready else b"")
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model, "object": "model", "created": created, "owned_by": "bakehouse"}
        if "max_model_len" in (described := client.describe() if state.ready else {}):
            card["max_model_len"] = described["max_model_len"]
        return {"object": "list", "data": [card]}

    # The bodies are parsed and validated off the event loop (`parsed`): a few MB of nested lists take a second of CPU, and
    # /health must answer meanwhile. The schemas still document the routes.
    @app.post("/v1/completions", openapi_extra=request_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = await parsed(request, CompletionRequest)
        return await serving(body.model).completions(body, request)

    @app.post("/v1/chat/completions", openapi_extra=request_schema(ChatRequest))
    async def chat(request: Request) -> Response:
        body = await parsed(request, ChatRequest)
        return await serving(body.model).chat(body, request)

    @app.post("/tokenize", openapi_extra=request_schema(TokenizeRequest))
    async def tokenize(request: Request) -> Response:
        body = await parsed(request, TokenizeRequest)
        return await serving(body.model).tokenize(body, request)

    @app.post("/detokenize", openapi_extra=request_schema(DetokenizeRequest))
    async def detokenize(request: Request) -> Response:
        body = await parsed(request, DetokenizeRequest)
        return await serving(body.model).detokenize(body, request)

    return app
