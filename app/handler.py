"""The first seed's serverless handler, on the same verified engine and the same request checks as the HTTP API.

    handler({"input": {"prompt": "Hello", "max_tokens": 32}})
    -> {"text": "...", "finish_reason": "length", "usage": {...}}

Run as a RunPod serverless worker with `python -m app.handler` (needs `pip install runpod`).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from pydantic import ValidationError

from app.config import Settings
from app.engine import Engine, load_verified
from app.schemas import ApiError, CompletionRequest, prompts_of, sampling, validation_error

DEFAULTS = {"max_tokens": 64, "temperature": 0.0}


@functools.cache
def engine() -> Engine:
    return load_verified(Settings.from_env()).engine


def handler(job: dict[str, Any]) -> dict[str, Any]:
    params = job.get("input") if isinstance(job, dict) else None
    if not isinstance(params, dict):
        return {"error": 'expected {"input": {"prompt": "...", "max_tokens": N}}'}
    settings = Settings.from_env()
    try:
        body = CompletionRequest.model_validate({**DEFAULTS, **params, "model": settings.model})
        if not isinstance(body.prompt, str):
            raise ApiError(400, "prompt: give one string", param="prompt")
        [prompt] = prompts_of(body)
        checked = sampling(body, settings.max_tokens_limit, max_tokens=body.max_tokens)
    except ValidationError as exc:
        return {"error": f"input.{validation_error(exc).message}"}
    except ApiError as exc:
        return {"error": f"input.{exc.message}"}
    result = engine().complete(prompt, max_tokens=checked["max_tokens"], temperature=checked["temperature"])
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
    return {"text": result.text, "finish_reason": result.finish_reason, "usage": usage}


def main() -> int:
    try:
        import runpod
    except ImportError:
        print("runpod is not installed (pip install runpod); for the HTTP API run `python -m app.entrypoint`.", file=sys.stderr)
        return 2
    runpod.serverless.start({"handler": handler})
    return 0


if __name__ == "__main__":
    sys.exit(main())
