"""The OpenAI protocol's requests: bodies and their checks (HTTP API and serverless handler alike); app.replies has the answers.

Strict types ('5' is not a number of tokens); unknown OpenAI parameters
(user, …) are accepted and ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.params import SamplingParams
from ops.errors import ApiError

Prompt = str | list[str] | list[int] | list[list[int]]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    prompt: Prompt
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(_Strict):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False


class DetokenizeRequest(_Strict):
    model: str
    tokens: list[int]


MAX_STOP_TOKEN_IDS = 1024
MAX_MESSAGES = 4096
SEED_RANGE = 2**63  # a seed n choices draw from is seed .. seed + n - 1, each a valid torch generator seed


def _between(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    """`value` in range; NaN and infinities are not (a NaN compares false with every bound, so it is checked first)."""
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bounds = f"above {low:g} and at most {high:g}" if low_open else f"between {low:g} and {high:g}"
        raise ApiError(400, f"{name} must be {bounds}, got {value}.", param=name)


def sampling(body: CompletionRequest | ChatRequest, limit: int, *, max_tokens: int, logprobs: int | None = None, echo: bool = False) -> SamplingParams:
    """The sampling settings a request asks for, checked against this server's limits."""
    if not 1 <= max_tokens <= limit:
        raise ApiError(400, f"max_tokens must be between 1 and {limit} on this server, got {max_tokens}.", param="max_tokens")
    _between("temperature", body.temperature, 0, 2)
    _between("top_p", body.top_p, 0, 1, low_open=True)
    _between("min_p", body.min_p, 0, 1)
    _between("presence_penalty", body.presence_penalty, -2, 2)
    _between("frequency_penalty", body.frequency_penalty, -2, 2)
    _between("repetition_penalty", body.repetition_penalty, 0.01, 2)
    if body.top_k < -1:
        raise ApiError(400, f"top_k must be -1 or 0 (off) or a positive number, got {body.top_k}.", param="top_k")
    if not 0 <= body.min_tokens <= max_tokens:
        raise ApiError(400, f"min_tokens must be between 0 and max_tokens ({max_tokens}), got {body.min_tokens}.", param="min_tokens")
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise ApiError(400, f"logprobs must be between 0 and 20, got {logprobs}.", param="logprobs")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 16 or any(len(s) > 512 for s in stop):
        raise ApiError(400, "stop: at most 16 strings of at most 512 characters.", param="stop")
    if len(body.stop_token_ids or ()) > MAX_STOP_TOKEN_IDS:
        raise ApiError(400, f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(body.stop_token_ids or ())}.", param="stop_token_ids")
    if body.seed is not None and not 0 <= body.seed <= SEED_RANGE - 1 - body.n:
        raise ApiError(400, f"seed must be between 0 and {SEED_RANGE - 1 - body.n} (with n={body.n}), got {body.seed}.", param="seed")
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0), min_p=body.min_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        stop=tuple(s for s in stop if s), stop_token_ids=tuple(body.stop_token_ids or ()), min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        seed=body.seed, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None,
    )


def prompts_of(body: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts, each text or token ids: one, or a list of them; none empty."""
    p = body.prompt
    if isinstance(p, str):
        prompts: list[str | list[int]] = [p]
    elif p and isinstance(p[0], int):
        prompts = [p]
    else:
        prompts = list(cast(list[str | list[int]], p))
    if not prompts:
        raise ApiError(400, "prompt: give a string, a list of strings, a list of token ids, or a list of such lists.", param="prompt")
    if any(len(x) == 0 for x in prompts):
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    return prompts


def check_text(value: Any, param: str) -> None:
    """Text the tokenizer can take: valid Unicode (a lone surrogate from JSON's \\ud800 is not)."""
    texts = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(400, f"{param}: not valid Unicode text (a lone surrogate at character {exc.start}).", param=param) from exc


def validation_error(exc: RequestValidationError | ValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") in ("json_invalid", "json_type"):
        return ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}).", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}.", param=param)


def bounded(text: str, limit: int, param: str) -> None:
    """Checked before tokenizing: a text longer than BAKEHOUSE_MAX_PROMPT_CHARS costs nothing."""
    if len(text) > limit:
        raise ApiError(400, f"{param}: {len(text)} characters; this server takes at most {limit} (BAKEHOUSE_MAX_PROMPT_CHARS). Shorten it.",
                       param=param, code="context_length_exceeded")


def count_choices(prompts: int, n: int, limit: int) -> None:
    """prompts x n sequences, checked before any prompt is tokenized."""
    if n < 1:
        raise ApiError(400, f"n must be at least 1, got {n}.", param="n")
    if prompts * n > limit:
        raise ApiError(400, f"this request asks for {prompts * n} completions (prompts x n); this server takes at most {limit} per request "
                       "(BAKEHOUSE_MAX_CHOICES). Split it.", param="n")


def check_messages(texts: list[str], limit: int) -> None:
    """Before a chat template renders them: how many messages, and how much text in all."""
    if len(texts) > MAX_MESSAGES:
        raise ApiError(400, f"messages: {len(texts)} messages; this server takes at most {MAX_MESSAGES}.", param="messages")
    total = sum(map(len, texts))
    if total > limit:
        raise ApiError(400, f"messages: {total} characters in all; this server takes at most {limit} (BAKEHOUSE_MAX_PROMPT_CHARS). Shorten them.",
                       param="messages", code="context_length_exceeded")


def check_ids(ids: list[int], vocab: int, param: str) -> list[int]:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{param}: token id {bad} is not in this model's vocabulary (0..{vocab - 1}).", param=param)
    return ids
