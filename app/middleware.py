"""ASGI middleware around the routes: the body limit and the request counter, and the one way an ApiError becomes a reply.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: a client's disconnect
still reaches the endpoint (which cancels its generation), and a stream passes
through untouched.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics
from ops.errors import ApiError


def error_response(error: ApiError) -> JSONResponse:
    """The OpenAI error shape with the error's status and headers (Retry-After on 429 and 503)."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def send_error(error: ApiError, scope: Scope, send: Send) -> None:
    await error_response(error)(scope, _no_receive, send)


class BodyLimit:
    """A request body over `limit` bytes is answered 413 as soon as it is over (declared or counted), never read whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
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
        await send_error(ApiError(413, f"the request body is larger than this server accepts ({self.limit} bytes, BAKEHOUSE_MAX_BODY_BYTES).",
                                  code="request_too_large"), scope, send)


class CountRequests:
    """Requests by route and status in /metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
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
