"""OpenAI-compatible request bodies. Strict types: '5' is not a number of tokens."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
