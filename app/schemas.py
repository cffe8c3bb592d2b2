"""OpenAI-compatible request bodies and their checks (HTTP API and serverless handler alike). Strict types: '5' is not a number of tokens."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ops.errors import BakehouseError


class _Request(BaseModel):
    # Unknown OpenAI parameters (user, logprobs, …) are accepted and ignored, as most servers do.
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    temperature: float = Field(default=1.0)
    top_p: float = Field(default=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = 1


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int = 16


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class ApiError(BakehouseError):
    """A request the API refuses: its HTTP status and the OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}, status_code=self.status)


def sampling(body: CompletionRequest | ChatRequest, limit: int, *, max_tokens: int) -> dict[str, Any]:
    """The sampling settings a request asks for, checked against this server's limits."""
    if not 1 <= max_tokens <= limit:
        raise ApiError(400, f"max_tokens must be between 1 and {limit} on this server, got {max_tokens}.", param="max_tokens")
    if not 0 <= body.temperature <= 2:
        raise ApiError(400, f"temperature must be between 0 and 2, got {body.temperature}.", param="temperature")
    if not 0 < body.top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {body.top_p}.", param="top_p")
    if body.n != 1:
        raise ApiError(400, "n must be 1 on this server; send several requests instead (they are batched together).", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "stop": stop}


def prompts_of(body: CompletionRequest) -> list[str]:
    """The request's prompts: one string, or a list of them (not streamed); none of them empty."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or (body.stream and len(prompts) != 1):
        raise ApiError(400, "prompt: give one string (or a list of strings without stream)", param="prompt")
    if any(not p for p in prompts):
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    return prompts


def validation_error(exc: RequestValidationError | ValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}).", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}.", param=param)
