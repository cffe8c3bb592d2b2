"""OpenAI reply shapes: a run's outputs gathered into a whole answer, or framed as server-sent events.

Only plain data goes in (a `Run`'s outputs, the request body, token texts from
the tokenizer); nothing here touches HTTP routing or the model.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi.responses import StreamingResponse

from app.params import FinishReason, Output, TokenLogprob
from app.schemas import ChatRequest, CompletionRequest


class Outputs(Protocol):
    """What a reply reads: every choice's outputs, collected (whole) or as they come (streamed)."""

    prompt_tokens: int
    collected: list[tuple[int, Output]]

    @property
    def count(self) -> int: ...
    def outputs(self) -> AsyncIterator[tuple[int, Output]]: ...
    def cancel(self) -> None: ...


class Texts(Protocol):
    """The tokenizer's side of a reply: a prompt's text (echo) and each token's text (logprobs)."""

    def decode(self, ids: Sequence[int]) -> str: ...
    def token_text(self, token: int) -> str: ...


@dataclass
class Gathered:
    text: str = ""
    finish: FinishReason | None = None
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


def gather(run: Outputs) -> list[Gathered]:
    gathered = [Gathered() for _ in range(run.count)]
    for index, out in run.collected:
        gathered[index].add(out)
    return gathered


def error_event(out: Output) -> dict[str, Any]:
    """A stream's error, as OpenAI-compatible servers send it: an event with an `error` object instead of choices."""
    return {"error": {"message": f"generation failed: {out.error}", "type": "server_error", "param": None, "code": "generation_failed"}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def sse(events: AsyncIterator[dict[str, Any]], on_close: Callable[[], None]) -> StreamingResponse:
    """Server-sent events ending with [DONE]; `on_close` runs however the stream ends (a client that went away included)."""

    async def stream() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            on_close()

    # X-Accel-Buffering: a proxy in front (nginx, Caddy) passes each event on as it comes.
    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class CompletionReply:
    """/v1/completions answers: whole, or as chunks."""

    def __init__(self, run: Outputs, texts: Texts, model: str, body: CompletionRequest, prompts: list[list[int]]) -> None:
        self.run, self.texts, self.model, self.body, self.prompts = run, texts, model, body, prompts
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
            text = self.texts.token_text(token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob if lp else None for _, lp in entries],
            "top_logprobs": [{self.texts.token_text(t): v for t, v in lp.top} if lp and lp.top else None for _, lp in entries],
            "text_offset": offsets,
        }

    def whole(self) -> dict[str, Any]:
        gathered = gather(self.run)
        choices = []
        for i, g in enumerate(gathered):
            prefix = self.texts.decode(self._prompt_of(i)) if self.body.echo else ""
            choices.append({"index": i, "text": prefix + g.text, "finish_reason": g.finish, "logprobs": self._logprobs(i, g, self.body.echo)})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices,
                "usage": usage(self.run.prompt_tokens, sum(len(g.token_ids) for g in gathered))}

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        completion_tokens = 0
        echoed: set[int] = set()
        async for index, out in self.run.outputs():
            if out.error is not None:
                yield error_event(out)
                continue
            g = Gathered()
            g.add(out)
            completion_tokens += len(out.token_ids)
            echo = self.body.echo and index not in echoed
            echoed.add(index)
            text = (self.texts.decode(self._prompt_of(index)) if echo else "") + out.text
            choice = {"index": index, "text": text, "finish_reason": out.finish, "logprobs": self._logprobs(index, g, echo)}
            yield self._chunk([choice])
        if self.body.include_usage:
            yield self._chunk([]) | {"usage": usage(self.run.prompt_tokens, completion_tokens)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices}


class ChatReply:
    """/v1/chat/completions answers: whole, or as chunks."""

    def __init__(self, run: Outputs, texts: Texts, model: str, body: ChatRequest) -> None:
        self.run, self.texts, self.model, self.body = run, texts, model, body
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.body.logprobs:
            return None

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.texts.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

        return {"content": [entry(lp.token, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]}

    def whole(self) -> dict[str, Any]:
        gathered = gather(self.run)
        choices = [{"index": i, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish, "logprobs": self._logprobs(g.logprobs)}
                   for i, g in enumerate(gathered)]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model, "choices": choices,
                "usage": usage(self.run.prompt_tokens, sum(len(g.token_ids) for g in gathered))}

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        for i in range(self.run.count):
            yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])
        completion_tokens = 0
        async for index, out in self.run.outputs():
            if out.error is not None:
                yield error_event(out)
                continue
            completion_tokens += len(out.token_ids)
            delta = {"content": out.text} if out.text else {}
            yield self._chunk([{"index": index, "delta": delta, "finish_reason": out.finish, "logprobs": self._logprobs(list(out.logprobs))}])
        if self.body.include_usage:
            yield self._chunk([]) | {"usage": usage(self.run.prompt_tokens, completion_tokens)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": choices}
