"""The HTTP API: /health, /ready, /v1/models, /v1/completions, /v1/chat/completions, /tokenize, /detokenize, /metrics.

Limits come before work: a body over BAKEHOUSE_MAX_BODY_BYTES is 413 before
it is read whole, a prompt over BAKEHOUSE_MAX_PROMPT_CHARS is 400 before it is
tokenized, tokenizing runs off the event loop, every prompt of a list (times
n) counts against BAKEHOUSE_MAX_CHOICES, a full queue is 429 with
Retry-After, and a client that goes away (streaming or not) cancels its
generation. /health answers whatever a request does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.engine import Engine, NotServableError, load_verified, verified
from app.metrics import Metrics
from app.sampling import SamplingParams, TokenLogprob
from app.scheduler import Choice, Output, QueueFullError, Scheduler, complete
from app.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_text,
    prompts_of,
    sampling,
    validation_error,
)
from app.vllm_engine import VllmChild, VllmOptions, vllm_argv
from ops.localhub import free_port

log = logging.getLogger("bakehouse.app")


@dataclass
class State:
    status: str = "starting"
    reason: str = "starting up"
    engine: Engine | None = None
    scheduler: Scheduler | None = None
    upstream: VllmChild | None = None  # the vLLM engine's child process
    stopping: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def load_model(settings: Settings, state: State, metrics: Metrics) -> None:
    """Load the verified model in the background and warm it up; /ready reflects each step."""

    def on_state(status: str, reason: str) -> None:
        state.status, state.reason = status, reason

    try:
        loaded = load_verified(settings, on_state)
        engine = loaded.engine
        metrics.verify_seconds.set(loaded.verify_seconds)
        metrics.load_seconds.set(engine.load_seconds)
        scheduler = Scheduler(engine, metrics, max_batch=settings.max_batch, step_tokens=settings.step_tokens, max_queue=settings.max_queue)
        on_state("warming", "warming up")
        t0 = time.monotonic()
        complete(scheduler, engine.encode("Hello") or [0], SamplingParams(max_tokens=2, temperature=0))
        metrics.warmup_seconds.set(time.monotonic() - t0)
        state.engine, state.scheduler = engine, scheduler
        state.status, state.reason = "ready", "ready"
        metrics.ready.set(1)
        log.info("ready: serving %s", settings.model)
    except NotServableError as exc:
        state.status, state.reason = "failed", str(exc)
        log.error("not serving: %s", exc)
    except Exception as exc:  # corrupt weights, out of memory: report through /ready, keep /health up
        state.status, state.reason = "failed", f"loading {settings.model} failed: {type(exc).__name__}: {exc}"
        log.exception("loading failed")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 as soon as it is over (declared or counted), never read whole."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self.refuse(scope, send)
            return
        # Read the body here, at most `limit` bytes of it, then hand it on: the app never sees a partial or oversized one.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await self.refuse(scope, send)
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope: Scope, send: Send) -> None:
        error = ApiError(413, f"the request body is larger than this server accepts ({self.limit} bytes, BAKEHOUSE_MAX_BODY_BYTES).", code="request_too_large")
        await error.response()(scope, _no_receive, send)


class CountRequests:
    """ASGI middleware: requests by route and status. Plain ASGI, so a client's disconnect still reaches the endpoint."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]

        async def seen(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, seen)
        finally:
            # Label by route, not raw path: a scanner's random URLs must not grow the series without bound.
            self.metrics.requests.labels(getattr(scope.get("route"), "path", "unmatched"), str(status[0])).inc()


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(settings: Settings) -> FastAPI:
    state, metrics = State(), Metrics()
    load = load_vllm if settings.engine == "vllm" else load_model

    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, args=(settings, state, metrics), name="loader", daemon=True).start()
        yield
        state.stopping = True
        if state.upstream is not None:
            state.upstream.stop()

    app = FastAPI(title="bakehouse", lifespan=lifespan)
    app.state.bakehouse = state
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        metrics.errors.labels(exc.type).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not decode the body at all
            return await api_error(request, ApiError(400, f"the request body is not valid JSON ({exc.detail}); send UTF-8 JSON.", code="invalid_json"))
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return await api_error(request, ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}.", type_=kind))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": settings.model, "state": state.status}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body: dict[str, object] = {"ready": state.status == "ready", "model": settings.model, "state": state.status, "reason": state.reason}
        if state.engine is not None:
            body["dtype"] = str(state.engine.dtype).removeprefix("torch.")
            if state.engine.precision is not None:
                body["precision_check"] = state.engine.precision.describe()
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        ours = generate_latest(metrics.registry)
        if state.upstream is not None and state.status == "ready":
            async with httpx.AsyncClient(timeout=5) as client:
                ours += (await client.get(f"{state.upstream.url}/metrics")).content
        return Response(ours, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model, "object": "model", "created": state.created, "owned_by": "bakehouse"}
        if state.engine is not None:
            card["max_model_len"] = state.engine.context
        return {"object": "list", "data": [card]}

    (vllm_routes if settings.engine == "vllm" else transformers_routes)(app, settings, state, metrics)
    return app


def transformers_routes(app: FastAPI, settings: Settings, state: State, metrics: Metrics) -> None:
    """The OpenAI routes on the transformers engine: validated here, generated by the scheduler."""

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        engine, _ = serving(state, settings, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give prompt or messages (one of them).", param="prompt")
        text = body.prompt if body.prompt is not None else engine.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages or []])
        check_text(text, "prompt")
        bounded(text, settings, "prompt")
        ids = await asyncio.to_thread(lambda: engine.tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"])
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        engine, _ = serving(state, settings, body.model)
        check_ids(body.tokens, engine, "tokens")
        return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine, scheduler = serving(state, settings, body.model)
        check_text(body.prompt, "prompt")
        prompts = prompts_of(body)
        count_choices(len(prompts) * body.n, settings)
        for p in prompts:
            if isinstance(p, str):
                bounded(p, settings, "prompt")
        ids = [await asyncio.to_thread(engine.encode, p) if isinstance(p, str) else check_ids(p, engine, "prompt") for p in prompts]
        max_tokens = body.max_tokens if body.max_tokens is not None else settings.max_tokens_limit
        check_ids(body.stop_token_ids or [], engine, "stop_token_ids")
        params = sampling(body, settings.max_tokens_limit, max_tokens=max_tokens, logprobs=body.logprobs, echo=body.echo)
        run = Run.start(scheduler, engine, ids, params, body.n, metrics)
        reply = CompletionReply(run, engine, settings.model, body, ids)
        if body.stream:
            return sse(reply.chunks(), run)
        await run.wait(request)
        return JSONResponse(reply.whole())

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        engine, scheduler = serving(state, settings, body.model)
        count_choices(body.n, settings)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        for m in messages:
            check_text(m["content"], "messages")
            bounded(m["content"], settings, "messages")
        prompt = await asyncio.to_thread(engine.chat_prompt, messages)
        ids = [await asyncio.to_thread(engine.encode, prompt)]
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = requested if requested is not None else min(256, settings.max_tokens_limit)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        check_ids(body.stop_token_ids or [], engine, "stop_token_ids")
        params = sampling(body, settings.max_tokens_limit, max_tokens=max_tokens, logprobs=logprobs)
        run = Run.start(scheduler, engine, ids, params, body.n, metrics)
        reply = ChatReply(run, engine, settings.model, body, ids)
        if body.stream:
            return sse(reply.chunks(), run)
        await run.wait(request)
        return JSONResponse(reply.whole())


def load_vllm(settings: Settings, state: State, metrics: Metrics) -> None:
    """Verify, then start vLLM on the verified directory and wait for it; /ready reflects each step."""

    def on_state(status: str, reason: str) -> None:
        state.status, state.reason = status, reason

    try:
        options = VllmOptions.from_env()
        with verified(settings, on_state) as v:
            metrics.verify_seconds.set(v.verify_seconds)
            if not v.safetensors_only:
                raise NotServableError(f"{settings.model}: the vLLM engine loads safetensors only; convert the weights, or use BAKEHOUSE_ENGINE=transformers.")
            on_state("loading", f"starting vLLM on {v.directory}")
            t0 = time.monotonic()
            port = free_port()
            dtype = "auto" if settings.dtype == "auto" else settings.dtype
            state.upstream = VllmChild(vllm_argv(options, v.directory, settings.model, port, dtype), port, Path(tempfile.gettempdir()) / f"bakehouse-vllm-{port}.log")
            state.upstream.wait_ready(alive=lambda: not state.stopping)
            metrics.load_seconds.set(time.monotonic() - t0)
        state.status, state.reason = "ready", "ready"
        metrics.ready.set(1)
        log.info("ready: vLLM serves %s", settings.model)
    except NotServableError as exc:
        state.status, state.reason = "failed", str(exc)
        log.error("not serving: %s", exc)
    except Exception as exc:  # vLLM missing, crashed at start, out of memory: report through /ready, keep /health up
        state.status, state.reason = "failed", f"starting vLLM for {settings.model} failed: {type(exc).__name__}: {exc}"
        log.error("not serving: %s", state.reason)


def vllm_routes(app: FastAPI, settings: Settings, state: State, metrics: Metrics) -> None:
    """The OpenAI routes on the vLLM engine: forwarded to the child; a client that goes away closes the upstream request."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10))

    async def forward(request: Request) -> Response:
        if state.upstream is None or state.status != "ready":
            raise ApiError(503, f"the model is not ready: {state.reason}. Poll GET /ready and retry.", type_="service_unavailable", code="not_ready")
        upstream = client.build_request("POST", state.upstream.url + request.url.path, content=await request.body(),
                                        headers={"content-type": request.headers.get("content-type", "application/json")})
        response = await client.send(upstream, stream=True)
        media = response.headers.get("content-type", "application/json")
        if media.startswith("text/event-stream"):
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                finally:
                    await response.aclose()

            return StreamingResponse(relay(), status_code=response.status_code, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        reading = asyncio.create_task(response.aread())
        while not reading.done():
            if await request.is_disconnected():
                reading.cancel()
                await response.aclose()
                raise ApiError(499, "the client went away", code="client_closed")
            await asyncio.wait([reading], timeout=0.5)
        await response.aclose()
        return Response(reading.result(), status_code=response.status_code, media_type=media)

    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        app.add_api_route(path, forward, methods=["POST"])


def serving(state: State, settings: Settings, model: str) -> tuple[Engine, Scheduler]:
    if state.engine is None or state.scheduler is None:
        raise ApiError(503, f"the model is not ready: {state.reason}. Poll GET /ready and retry.", type_="service_unavailable", code="not_ready")
    if model != settings.model:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {settings.model!r} (GET /v1/models).", param="model", code="model_not_found")
    return state.engine, state.scheduler


def bounded(text: str, settings: Settings, param: str) -> None:
    if len(text) > settings.max_prompt_chars:
        raise ApiError(400, f"{param}: {len(text)} characters; this server takes at most {settings.max_prompt_chars} (BAKEHOUSE_MAX_PROMPT_CHARS). Shorten it.",
                       param=param, code="context_length_exceeded")


def count_choices(count: int, settings: Settings) -> None:
    if count > settings.max_choices:
        raise ApiError(400, f"this request asks for {count} completions (prompts x n); this server takes at most {settings.max_choices} per request "
                       "(BAKEHOUSE_MAX_CHOICES). Split it.", param="n")


def check_ids(ids: list[int], engine: Engine, param: str) -> list[int]:
    vocab = len(engine.tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{param}: token id {bad} is not in this model's vocabulary (0..{vocab - 1}).", param=param)
    return ids


@dataclass
class Run:
    """Every choice of one request, their outputs in one queue, and the way to cancel them all."""

    choices: list[Choice]
    queue: asyncio.Queue[tuple[int, Output]]
    prompt_tokens: int
    done: int = 0
    collected: list[tuple[int, Output]] = field(default_factory=list)

    @classmethod
    def start(cls, scheduler: Scheduler, engine: Engine, prompts: list[list[int]], params: SamplingParams, n: int, metrics: Metrics) -> Run:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        choices = []
        for p in prompts:
            if len(p) >= engine.context:
                raise ApiError(400, f"the prompt is {len(p)} tokens; this model's context is {engine.context} tokens. Shorten the prompt.",
                               param="prompt", code="context_length_exceeded")
            for j in range(n):
                seeded = params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)
                index = len(choices)
                emit = (lambda i: lambda out: loop.call_soon_threadsafe(queue.put_nowait, (i, out)))(index)
                choices.append(Choice(list(p), seeded, emit, budget=min(params.max_tokens, engine.context - len(p))))
        try:
            scheduler.submit(choices)
        except QueueFullError as exc:
            raise ApiError(429, f"the server is busy: {exc}. Retry after a second.", type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from exc
        metrics.prompt_tokens.inc(sum(map(len, prompts)))
        return cls(choices, queue, sum(map(len, prompts)))

    def cancel(self) -> None:
        for c in self.choices:
            if c.finish is None:
                c.cancelled.set()

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        while self.done < len(self.choices):
            index, out = await self.queue.get()
            if out.finish is not None:
                self.done += 1
            yield index, out

    async def wait(self, request: Request) -> None:
        """Run to the end; a client that goes away meanwhile cancels every choice."""
        async def collect() -> None:
            async for item in self.outputs():
                self.collected.append(item)

        task = asyncio.create_task(collect())
        while not task.done():
            if await request.is_disconnected():
                self.cancel()
                task.cancel()
                raise ApiError(499, "the client went away", code="client_closed")
            await asyncio.wait([task], timeout=0.5)


def sse(events: AsyncIterator[dict[str, Any]], run: Run) -> StreamingResponse:
    async def stream() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): nothing left generates for it
            run.cancel()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@dataclass
class Gathered:
    text: str = ""
    finish: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()

    def add(self, out: Output) -> None:
        self.text += out.text
        self.finish = out.finish or self.finish
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class CompletionReply:
    """/v1/completions answers: whole, or as chunks."""

    def __init__(self, run: Run, engine: Engine, model: str, body: CompletionRequest, prompts: list[list[int]]):
        self.run, self.engine, self.model, self.body, self.prompts = run, engine, model, body, prompts
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _prompt_of(self, index: int) -> list[int]:
        return self.prompts[index // self.body.n]

    def _logprobs(self, index: int, g: Gathered, echoed: bool) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        entries: list[tuple[int, TokenLogprob | None]] = []
        if echoed:
            prompt = self._prompt_of(index)
            entries += [(t, g.prompt_logprobs[k] if k < len(g.prompt_logprobs) else None) for k, t in enumerate(prompt)]
        entries += [(lp.token, lp) for lp in g.logprobs]
        tokens, offsets, offset = [], [], 0
        for token, _ in entries:
            text = self.engine.token_text(token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob if lp else None for _, lp in entries],
            "top_logprobs": [{self.engine.token_text(t): v for t, v in lp.top} if lp and lp.top else None for _, lp in entries],
            "text_offset": offsets,
        }

    def whole(self) -> dict[str, Any]:
        gathered = [Gathered() for _ in self.run.choices]
        for index, out in self.run.collected:
            gathered[index].add(out)
        choices = []
        for i, g in enumerate(gathered):
            prefix = self.engine.decode(self._prompt_of(i)) if self.body.echo else ""
            choices.append({"index": i, "text": prefix + g.text, "finish_reason": g.finish, "logprobs": self._logprobs(i, g, self.body.echo)})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices,
                "usage": usage(self.run.prompt_tokens, sum(len(g.token_ids) for g in gathered))}

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        completion_tokens = 0
        echoed: set[int] = set()
        async for index, out in self.run.outputs():
            g = Gathered()
            g.add(out)
            completion_tokens += len(out.token_ids)
            echo = self.body.echo and index not in echoed
            echoed.add(index)
            text = (self.engine.decode(self._prompt_of(index)) if echo else "") + out.text
            choice = {"index": index, "text": text, "finish_reason": out.finish, "logprobs": self._logprobs(index, g, echo)}
            yield self._chunk([choice])
        if self.body.include_usage:
            yield self._chunk([]) | {"usage": usage(self.run.prompt_tokens, completion_tokens)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices}


class ChatReply:
    """/v1/chat/completions answers: whole, or as chunks."""

    def __init__(self, run: Run, engine: Engine, model: str, body: ChatRequest, prompts: list[list[int]]):
        self.run, self.engine, self.model, self.body, self.prompts = run, engine, model, body, prompts
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.body.logprobs:
            return None

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.engine.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

        return {"content": [entry(lp.token, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]}

    def whole(self) -> dict[str, Any]:
        gathered = [Gathered() for _ in self.run.choices]
        for index, out in self.run.collected:
            gathered[index].add(out)
        choices = [{"index": i, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish, "logprobs": self._logprobs(g.logprobs)}
                   for i, g in enumerate(gathered)]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model, "choices": choices,
                "usage": usage(self.run.prompt_tokens, sum(len(g.token_ids) for g in gathered))}

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        for i in range(len(self.run.choices)):
            yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])
        completion_tokens = 0
        async for index, out in self.run.outputs():
            completion_tokens += len(out.token_ids)
            delta = {"content": out.text} if out.text else {}
            yield self._chunk([{"index": index, "delta": delta, "finish_reason": out.finish, "logprobs": self._logprobs(list(out.logprobs))}])
        if self.body.include_usage:
            yield self._chunk([]) | {"usage": usage(self.run.prompt_tokens, completion_tokens)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": choices}
