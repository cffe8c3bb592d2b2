"""The HTTP API: /health, /ready, /v1/models, /v1/completions, /v1/chat/completions, /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.batching import Batcher, Piece
from app.config import Settings
from app.engine import Engine, NotServableError, load_verified
from app.metrics import Metrics
from app.schemas import ApiError, ChatRequest, CompletionRequest, prompts_of, sampling, validation_error

log = logging.getLogger("bakehouse.app")


@dataclass
class State:
    status: str = "starting"
    reason: str = "starting up"
    engine: Engine | None = None
    batcher: Batcher | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def load_model(settings: Settings, state: State, metrics: Metrics) -> None:
    """Load the verified model in the background; /ready reflects each step."""

    def on_state(status: str, reason: str) -> None:
        state.status, state.reason = status, reason

    try:
        loaded = load_verified(settings, on_state)
        engine = loaded.engine
        metrics.verify_seconds.set(loaded.verify_seconds)
        metrics.load_seconds.set(engine.load_seconds)
        metrics.warmup_seconds.set(loaded.warmup_seconds)
        state.engine = engine
        state.batcher = Batcher(engine, metrics, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000)
        state.status, state.reason = "ready", "ready"
        metrics.ready.set(1)
        log.info("ready: serving %s", settings.model)
    except NotServableError as exc:
        state.status, state.reason = "failed", str(exc)
        log.error("not serving: %s", exc)
    except Exception as exc:  # corrupt weights, out of memory: report through /ready, keep /health up
        state.status, state.reason = "failed", f"loading {settings.model} failed: {type(exc).__name__}: {exc}"
        log.exception("loading failed")


def create_app(settings: Settings) -> FastAPI:
    state, metrics = State(), Metrics()

    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load_model, args=(settings, state, metrics), name="loader", daemon=True).start()
        yield

    app = FastAPI(title="bakehouse", lifespan=lifespan)
    app.state.bakehouse = state

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        # Label by route, not raw path: a scanner's random URLs must not grow the series without bound.
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        metrics.errors.labels(exc.type).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(_request, validation_error(exc))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": settings.model, "state": state.status}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body = {"ready": state.status == "ready", "model": settings.model, "state": state.status, "reason": state.reason}
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model, "object": "model", "created": state.created, "owned_by": "bakehouse"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        engine, batcher = serving(state, settings, body.model)
        prompts = prompts_of(body)
        params = sampling(body, settings.max_tokens_limit, max_tokens=body.max_tokens)
        ids = [prompt_ids(engine, p) for p in prompts]
        metrics.prompt_tokens.inc(sum(map(len, ids)))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return sse(completion_chunks(batcher, ids[0], params, rid, created, settings.model))
        results = await asyncio.gather(*(collect(batcher, i, params) for i in ids))
        choices = [{"index": n, "text": text, "finish_reason": finish, "logprobs": None} for n, (text, finish, _) in enumerate(results)]
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": settings.model, "choices": choices, "usage": usage(ids, results)})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Response:
        engine, batcher = serving(state, settings, body.model)
        prompt = engine.chat_prompt([m.model_dump(include={"role", "content"}) for m in body.messages])
        params = sampling(body, settings.max_tokens_limit, max_tokens=body.max_completion_tokens or body.max_tokens or min(256, settings.max_tokens_limit))
        ids = prompt_ids(engine, prompt)
        metrics.prompt_tokens.inc(len(ids))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return sse(chat_chunks(batcher, ids, params, rid, created, settings.model))
        text, finish, generated = await collect(batcher, ids, params)
        message = {"role": "assistant", "content": text}
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": settings.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage([ids], [(text, finish, generated)]),
        })

    return app


def serving(state: State, settings: Settings, model: str) -> tuple[Engine, Batcher]:
    if state.engine is None or state.batcher is None:
        raise ApiError(503, f"the model is not ready: {state.reason}. Poll GET /ready and retry.", type_="service_unavailable", code="not_ready")
    if model != settings.model:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {settings.model!r} (GET /v1/models).", param="model", code="model_not_found")
    return state.engine, state.batcher


def prompt_ids(engine: Engine, prompt: str) -> list[int]:
    ids = engine.encode(prompt) or [engine.pad]
    if len(ids) >= engine.context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context is {engine.context} tokens. Shorten the prompt.", param="prompt", code="context_length_exceeded")
    return ids


async def collect(batcher: Batcher, ids: list[int], params: dict[str, Any]) -> tuple[str, str, int]:
    parts, finish, count = [], "length", 0
    async for piece in batcher.stream(ids, **params):
        parts.append(piece.text)
        count += 1
        finish = piece.finish or finish
    return "".join(parts), finish, count


def usage(ids: list[list[int]], results: list[tuple[str, str, int]]) -> dict[str, int]:
    prompt = sum(len(i) for i in ids)
    completion = sum(n for _, _, n in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def completion_chunks(batcher: Batcher, ids: list[int], params: dict[str, Any], rid: str, created: int, model: str) -> AsyncIterator[dict[str, Any]]:
    async for piece in batcher.stream(ids, **params):
        yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [{"index": 0, "text": piece.text, "finish_reason": piece.finish, "logprobs": None}]}


async def chat_chunks(batcher: Batcher, ids: list[int], params: dict[str, Any], rid: str, created: int, model: str) -> AsyncIterator[dict[str, Any]]:
    def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""}, None)
    piece: Piece
    async for piece in batcher.stream(ids, **params):
        yield chunk({"content": piece.text} if piece.text else {}, piece.finish)
