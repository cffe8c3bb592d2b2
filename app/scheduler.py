"""The scheduler's runner: one worker thread that owns the model and carries out the policy's plans (app.policy).

Each iteration asks the policy for a step plan, makes the cache moves it
owes, runs one forward pass over the plan (app.kvcache.Step: a token for every
running row, each at its own length in the slotted KV cache, and the prompt
chunks, each in its own slot; the weights are read once for all), samples a
token for every row the plan names, each with its own settings
(app.sampling), detokenizes, and hands the results back to the policy, which
says what each consumer is sent.

transformers 5's continuous batching (`generate_batch`, paged caches) was
measured first: on CPU it runs one masked attention over every request's
cache and shares the first request's sampling settings across the batch
(17.4 / 31.8 / 29.6 tokens/s at concurrency 1 / 8 / 32 on a 134 M Llama,
against vLLM-CPU's 19.0 / 78.2 / 118.6), so this engine keeps its own
scheduler over the model's standard forward pass and Cache API.

The thread runs between `start()` and `stop()`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.engine import Engine
from app.kvcache import DecodeChoice, Segment, SlotCache
from app.metrics import Metrics
from app.params import FinishReason, Output, SamplingParams, TokenLogprob
from app.policy import Choice, Policy, StepPlan
from app.sampling import logprobs_of, sample

log = logging.getLogger("bakehouse.scheduler")
PACK_SECONDS = 0.02  # packing between steps adds at most about this to a step while it lasts


class Detokenizer:
    """Incremental: each token decodes a short window, not the whole text again; half a character waits for the rest."""

    def __init__(self, tokenizer: object, context: Sequence[int]) -> None:
        self.tokenizer, self.ids = tokenizer, list(context)
        self.prefix, self.read = 0, len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode  # type: ignore[attr-defined]
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


def choice(prompt: list[int], params: SamplingParams, context: int, emit: object = None) -> Choice:
    """A choice of `prompt`, its budget what max_tokens and the context left allow; seeded rows draw from their own generator."""
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    seq = Choice(list(prompt), params, budget=min(params.max_tokens, context - len(prompt)), generator=generator)
    if emit is not None:
        seq.emit = emit  # type: ignore[assignment]
    return seq


class Scheduler:
    def __init__(self, engine: Engine, metrics: Metrics, *, max_batch: int, step_tokens: int = 512, max_queue: int = 256, max_prefill: int = 8,
                 kv_columns: int | None = None) -> None:
        self.engine, self.metrics = engine, metrics
        self.policy = Policy(max_batch=max_batch, step_tokens=step_tokens, max_queue=max_queue, max_prefill=max_prefill, eos=engine.eos,
                             kv_columns=kv_columns)
        self.cache = SlotCache(engine.num_layers, self.policy.slots, engine.attention)
        self._wake = threading.Condition()
        self._adopt: DecodeChoice | None = None  # a decode kernel to switch to before the next step (app.tuning)
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the worker after its current step; whatever is still queued or running is not answered further."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the request side (any thread) ----------------------------------------

    def submit(self, choices: Sequence[Choice]) -> None:
        """Queue every choice of a request, or none of them (QueueFullError)."""
        self.policy.submit(choices)
        self.metrics.queue_depth.set(self.policy.queued)
        with self._wake:
            self._wake.notify()

    @property
    def load(self) -> int:
        return self.policy.load

    def adopt(self, decode: DecodeChoice) -> None:
        """Decode rows attend with `decode` from the worker's next iteration on (between two steps, where no forward pass reads the cache)."""
        with self._wake:
            self._adopt = decode
            self._wake.notify()

    # --- the worker ------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self.policy.idle and not self._stopping and not self.engine.pending.layers and self._adopt is None:
                    self._wake.wait()
                if self._stopping:
                    return
                adopt, self._adopt = self._adopt, None
            if adopt is not None:
                with torch.inference_mode():  # the converted cache made of inference tensors, as the steps make theirs
                    self.cache.switch(adopt, self.engine.dtype)
                self.engine.attention = adopt
                log.info("%s: decode attention switched to %s", self.engine.name, adopt.describe())
            if self.engine.pending.layers and not self._pack():
                continue
            plan = self.policy.schedule()
            self.metrics.queue_depth.set(self.policy.queued)
            self.metrics.cancelled.inc(len(plan.dropped))
            try:
                self._step(plan)
            except Exception as exc:  # a failed forward pass (out of memory, …) must answer its requests, not hang them
                log.error("a generation step failed for %d sequence(s): %s: %s", len(plan.rows) + len(plan.chunks), type(exc).__name__, exc)
                log.debug("the step's traceback", exc_info=True)
                self.metrics.errors.labels("generation_error").inc(len(plan.rows) + len(plan.chunks))
                self._send(self.policy.fail([*plan.rows, *(c.seq for c in plan.chunks)], f"generation failed on the server ({type(exc).__name__})"))

    def _pack(self) -> bool:
        """Pack a few linear layers (app.packed), here between steps, where no forward pass uses them; whether a step should run now."""
        left = self.engine.pending.pack(PACK_SECONDS)
        if not left:
            log.info("%s: %d linear layers packed for oneDNN", self.engine.name, self.engine.pending.packed)
        return not self.policy.idle

    @torch.inference_mode()
    def _step(self, plan: StepPlan) -> None:
        for move in plan.moves:
            self.cache.move(move.src, move.dst)
        if plan.empty:
            return
        device = self.engine.device
        lengths = torch.tensor(plan.lengths, device=device) if plan.rows else None
        live = {s.slot for s in self.policy.prefilling}
        self.cache.plan(lengths, [Segment(c.slot, c.start, c.count) for c in plan.chunks], self.engine.dtype, device, live=live)
        logits = self.engine.forward(plan.token_ids, self.cache, torch.tensor(plan.keep, dtype=torch.long, device=device)).float()
        if plan.rows:
            self.metrics.batch_size.observe(len(plan.rows))
        scored = {i: logprobs_of(logits[at : at + len(c.targets)], c.targets, c.seq.params.logprobs or 0)
                  for i, (c, at) in enumerate(plan.scored_at) if c.targets}
        prompt_logprobs = {plan.chunks.index(c): scored[i] for i, (c, _) in enumerate(plan.scored_at) if i in scored}
        sampled = plan.sampled
        picked = logits[plan.sampled_at]
        tokens, failed = sample(picked, sampled, self.engine.eos) if sampled else ([], {})
        for exc in failed.values():
            log.warning("sampling failed for one sequence (%s: %s); it ends with an error, the others go on", type(exc).__name__, exc)
            log.debug("the sampling traceback", exc_info=exc)
        self.metrics.errors.labels("sampling_error").inc(len(failed))
        logprobs = self._logprobs(sampled, picked, tokens)
        self.metrics.tokens.inc(len(sampled) - len(failed))
        update = self.policy.update(plan, tokens, self._decode, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                    failed="its sampling settings gave no valid probabilities; choose other settings")
        now = time.monotonic()
        for seq in update.started:
            self.metrics.ttft.observe(now - seq.submitted)
        self._send(update.sent)

    @staticmethod
    def _logprobs(rows: Sequence[Choice], logits: torch.Tensor, tokens: Sequence[int | None]) -> dict[int, TokenLogprob]:
        want = [i for i, s in enumerate(rows) if s.params.logprobs is not None and tokens[i] is not None]
        if not want:
            return {}
        top = max(rows[i].params.logprobs or 0 for i in want)
        return dict(zip(want, logprobs_of(logits[want], [t for i in want if (t := tokens[i]) is not None], top), strict=True))

    def _decode(self, seq: Choice, token: int) -> str:
        if seq.detok is None:
            seq.detok = Detokenizer(self.engine.tokenizer, seq.prompt[-6:])
        return seq.detok.add(token)

    @staticmethod
    def _send(sent: list[tuple[Choice, Output]]) -> None:
        for seq, out in sent:
            seq.emit(out)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


def complete(scheduler: Scheduler, prompt: list[int], params: SamplingParams) -> Completion:
    """One choice, waited for in this thread: the warm-up, and the serverless handler."""
    done = threading.Event()
    parts: list[str] = []
    tokens: list[int] = []
    finish: list[FinishReason] = []

    def emit(out: Output) -> None:
        parts.append(out.text)
        tokens.extend(out.token_ids)
        if out.finish is not None:
            finish.append(out.finish)
            done.set()

    scheduler.submit([choice(prompt, params, scheduler.engine.context, emit)])
    done.wait()
    return Completion("".join(parts), finish[0], len(prompt), len(tokens))
