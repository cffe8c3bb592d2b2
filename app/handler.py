"""The first seed's serverless handler, on the same verified engine.

    handler({"input": {"prompt": "Hello", "max_tokens": 32}})
    -> {"text": "...", "finish_reason": "length", "usage": {...}}

Run as a RunPod serverless worker with `python -m app.handler` (needs `pip install runpod`).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from app.config import Settings
from app.engine import Engine, check_weights_format, verified_path
from ops.models.store import Store


@functools.cache
def engine() -> Engine:
    settings = Settings.from_env()
    model, directory = verified_path(Store(settings.models_dir), settings.lock, settings.model)
    e = Engine(directory, name=settings.model, safetensors_only=check_weights_format(model, settings.allow_pickle))
    e.warm_up()
    return e


def handler(job: dict[str, Any]) -> dict[str, Any]:
    params = job.get("input") if isinstance(job, dict) else None
    if not isinstance(params, dict):
        return {"error": 'expected {"input": {"prompt": "...", "max_tokens": N}}'}
    prompt, max_tokens = params.get("prompt"), params.get("max_tokens", 64)
    limit = Settings.from_env().max_tokens_limit
    if not isinstance(prompt, str) or not prompt:
        return {"error": "input.prompt must be a non-empty string"}
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= limit:
        return {"error": f"input.max_tokens must be an integer between 1 and {limit}"}
    temperature = params.get("temperature", 0.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        return {"error": "input.temperature must be a number between 0 and 2"}
    result = engine().complete(prompt, max_tokens=max_tokens, temperature=float(temperature))
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
