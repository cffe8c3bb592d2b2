"""The first seed's serverless handler, on the same verified engine, scheduler and request checks as the HTTP API.

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
from app.loader import verified
from app.local import LocalClient
from app.metrics import Metrics
from app.scheduler import Scheduler, complete
from app.schemas import CompletionRequest, check_text, prompts_of, sampling, validation_error
from ops.errors import ApiError

DEFAULT_MAX_TOKENS = 64
DEFAULTS = {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": 0.0}


@functools.cache
def scheduler() -> Scheduler:
    """The same loader and engine client as the HTTP API, started once per worker."""
    settings = Settings.from_env()
    client = LocalClient(settings, Metrics())
    with verified(settings, lambda status, reason: None) as v:
        client.start(v)
    assert client.scheduler is not None
    return client.scheduler


def handler(job: dict[str, Any]) -> dict[str, Any]:
    params = job.get("input") if isinstance(job, dict) else None
    if not isinstance(params, dict):
        return {"error": 'expected {"input": {"prompt": "...", "max_tokens": N}}'}
    settings = Settings.from_env()
    try:
        body = CompletionRequest.model_validate({**DEFAULTS, **params, "model": settings.model})
        if not isinstance(body.prompt, str):
            raise ApiError(400, "prompt: give one string", param="prompt")
        check_text(body.prompt, "prompt")
        [prompt] = prompts_of(body)
        checked = sampling(body, settings.max_tokens_limit, max_tokens=body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS)
    except ValidationError as exc:
        return {"error": f"input.{validation_error(exc).message}"}
    except ApiError as exc:
        return {"error": f"input.{exc.message}"}
    s = scheduler()
    ids = s.engine.encode(str(prompt))
    if len(ids) >= s.engine.context:
        return {"error": f"input.prompt is {len(ids)} tokens; this model's context is {s.engine.context} tokens"}
    result = complete(s, ids, checked)
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
