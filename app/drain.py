"""Graceful drain: on SIGTERM an instance leaves the front proxy's rotation, finishes what it runs, and exits 0.

1. /ready turns 503 at once ("draining").
2. For `deregister` seconds it still takes new requests: the front proxy
   checks /ready every 0.2 s, so by then it has stopped sending here; a request
   already on its way is served, not refused.
3. Then new work is answered 503 with Retry-After (the proxy holds or sends it
   to the other instance), and every running request and stream goes on to its
   end, for at most `seconds` (BAKEHOUSE_DRAIN_SECONDS).
4. The server stops: the engine is released (the scheduler's thread, the vLLM
   child), and the process exits 0.

An instance that was not ready yet has nothing routed to it: it stops at once.
`in_flight` counts the OpenAI routes' requests from their first byte to the
last byte of their answer, streams included, whichever engine serves them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from app.middleware import send_error
from ops.errors import ApiError

log = logging.getLogger("bakehouse.drain")
WORK_PATHS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


class Drain:
    def __init__(self, *, deregister: float, seconds: float) -> None:
        self.deregister, self.seconds = deregister, seconds
        self.draining = False  # /ready says 503
        self.refusing = False  # new work is answered 503
        self.in_flight = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        """A request for work arrives: False when it must be refused."""
        with self._lock:
            if self.refusing:
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def run(self, was_ready: bool, stop: Callable[[], None]) -> None:
        """The drain, in the calling thread: deregister, refuse, wait for the running requests, then `stop` the server."""
        self.draining = True
        if was_ready:
            log.info("draining: /ready is 503; still taking requests for %.1fs while the front proxy takes this instance out", self.deregister)
            time.sleep(self.deregister)
        with self._lock:
            self.refusing = True
            running = self.in_flight
        log.info("draining: new requests refused; waiting for %d running request(s), at most %.0fs", running, self.seconds)
        deadline = time.monotonic() + self.seconds
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.in_flight:
            log.warning("draining: %d request(s) still running after %.0fs (BAKEHOUSE_DRAIN_SECONDS); stopping anyway", self.in_flight, self.seconds)
        else:
            log.info("drained: every request finished")
        stop()


class DrainGate:
    """ASGI middleware: counts work in flight, and refuses new work once the drain says so."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in WORK_PATHS:
            await self.app(scope, receive, send)
            return
        if not self.drain.enter():
            error = ApiError(503, "this instance is stopping (a deploy or a restart); retry in a second: the host's other instance or the next release "
                                  "answers.", type_="service_unavailable", code="draining", headers={"Retry-After": "1"})
            await send_error(error, scope, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()
