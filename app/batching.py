"""Dynamic batching: requests that arrive within a short wait share forward passes.

One worker thread owns the model. It takes the first waiting request, then
gathers more for up to `max_wait` (or until `max_batch`), and decodes them
together. Results flow back to each request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from app.engine import Engine, Row
from app.metrics import Metrics


@dataclass(frozen=True)
class Piece:
    text: str
    finish: str | None


class Batcher:
    def __init__(self, engine: Engine, metrics: Metrics, *, max_batch: int, max_wait_s: float):
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: queue.Queue[Row] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    async def stream(self, prompt_ids: list[int], *, max_tokens: int, temperature: float, top_p: float, stop: Sequence[str]) -> AsyncIterator[Piece]:
        """Yield pieces of generated text; closing the iterator cancels the generation."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Piece] = asyncio.Queue()
        submitted = time.monotonic()
        first = True

        def emit(text: str, finish: str | None) -> None:
            loop.call_soon_threadsafe(out.put_nowait, Piece(text, finish))

        row = Row(prompt_ids, max_tokens, temperature, top_p, stop, emit)
        self._queue.put(row)
        self.metrics.queue_depth.set(self._queue.qsize())
        try:
            while True:
                piece = await out.get()
                if first:
                    self.metrics.ttft.observe(time.monotonic() - submitted)
                    first = False
                yield piece
                if piece.finish:
                    return
        finally:
            if row.finish is None:
                row.cancelled.set()
                self.metrics.cancelled.inc()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            self.metrics.queue_depth.set(self._queue.qsize())
            live = [r for r in batch if not r.cancelled.is_set()]
            if not live:
                continue
            self.metrics.batch_size.observe(len(live))
            try:
                self.engine.generate(live)
            except Exception as exc:  # a failed batch must answer its requests, not hang them
                for r in live:
                    if r.finish is None:
                        r.finish = "error"
                        r.emit(f"[generation failed: {type(exc).__name__}]", "error")
            self.metrics.tokens.inc(sum(len(r.generated) for r in live))
