"""The scheduler's policy: what the next step runs, and what its sampled tokens do. No tensors, no model, no thread.

Continuous (iteration-level) batching, as vLLM's `schedule()` / `update_from_output()`:

- `schedule()` drops sequences whose client went away, takes waiting ones
  into free prefill slots while the step's token budget (`step_tokens`,
  after one token for each running row) lasts, and gives each prompt under
  way a chunk: a long prompt never freezes the running rows for more than a
  chunk, and several short prompts start in the same step. It returns a
  `StepPlan`: the cache moves to make first, the decode rows (slot i is row
  i), the prompt chunks, and which logits rows are sampled or scored.
- `update(plan, ...)` folds the step's results back in: a prompt that is now
  complete joins the running rows (a move from its prefill slot), every
  sampled row advances by its token (stop tokens, stop strings, budgets),
  finished rows leave (the last row takes the freed slot, so running rows
  stay in slots [0, n)), and it returns what each consumer is sent.

Each row has its own budget: its max_tokens, and the context left after its
own prompt. The runner (app.scheduler) owns the model, the cache and the
sampling; everything here is checked in tests with plain lists.
"""

from __future__ import annotations

import collections
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from app.params import FinishReason, Output, SamplingParams, TokenLogprob
from app.seats import cache_columns
from ops.errors import QueueFullError

Emit = Callable[[Output], None]
Decode = Callable[["Choice", int], str]


def _discard(out: Output) -> None:
    """The consumer of a sequence nobody listens to (a test's, a warm-up's)."""


@dataclass(eq=False)
class Choice:
    """One choice of one request (n choices per prompt), from its prompt to its finish."""

    prompt: list[int]
    params: SamplingParams
    budget: int
    emit: Emit = _discard
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    length: int = 0  # tokens in the cache
    slot: int = -1  # while its prompt is prefilled: the cache slot it goes into
    next_token: int = -1
    generated: list[int] = field(default_factory=list)
    counts: Counter[int] = field(default_factory=Counter)
    text: str = ""
    emitted: int = 0  # characters of `text` already sent (the rest may be the start of a stop string)
    finish: FinishReason | None = None
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    prompt_sent: bool = False
    columns: int = 0  # KV cache columns it is admitted against: its tier's, at its longest (app.seats)
    # The runner's, opaque here: the row's random generator (a seeded request) and its incremental detokenizer.
    generator: Any = None
    detok: Any = None


@dataclass(frozen=True)
class Move:
    """Slot `dst` takes over what slot `src` holds, `length` positions (a row changing slots; the cache renames it, app.seats)."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class Chunk:
    """`count` tokens of `seq`'s prompt, from column `start`, into cache slot `slot`."""

    seq: Choice
    slot: int
    start: int
    count: int

    @property
    def completes(self) -> bool:
        return self.start + self.count == len(self.seq.prompt)

    @property
    def scored(self) -> int:
        """Logits rows this chunk needs: every position for prompt logprobs, else the last one when the prompt completes here."""
        return self.count if self.seq.params.prompt_logprobs else int(self.completes)

    @property
    def targets(self) -> list[int]:
        """The prompt tokens this chunk's positions predict (prompt logprobs)."""
        return self.seq.prompt[self.start + 1 : self.start + self.count + 1]


@dataclass(frozen=True)
class StepPlan:
    moves: tuple[Move, ...] = ()  # made on the cache first, in order
    rows: tuple[Choice, ...] = ()  # decode rows: row i is in slot i and adds one token
    chunks: tuple[Chunk, ...] = ()
    dropped: tuple[Choice, ...] = ()  # cancelled: gone without a word (their clients went away)

    @property
    def empty(self) -> bool:
        return not (self.rows or self.chunks)

    @property
    def token_ids(self) -> list[int]:
        """The step's packed input: each row's last token, then each chunk's prompt tokens."""
        ids = [s.next_token for s in self.rows]
        for c in self.chunks:
            ids += c.seq.prompt[c.start : c.start + c.count]
        return ids

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.rows]

    @property
    def keep(self) -> list[int]:
        """The packed positions whose logits the step needs, in the order `sampled_at` and `scored_at` index them."""
        keep, at = list(range(len(self.rows))), len(self.rows)
        for c in self.chunks:
            keep += range(at + c.count - c.scored, at + c.count)
            at += c.count
        return keep

    def _chunk_offsets(self) -> list[int]:
        offsets, at = [], len(self.rows)
        for c in self.chunks:
            offsets.append(at)
            at += c.scored
        return offsets

    @property
    def sampled(self) -> list[Choice]:
        """Who gets a token from this step: every row, and every prompt completed by it."""
        return [*self.rows, *(c.seq for c in self.chunks if c.completes)]

    @property
    def sampled_at(self) -> list[int]:
        """For each of `sampled`, its row in the kept logits."""
        return [*range(len(self.rows)), *(at + c.scored - 1 for c, at in zip(self.chunks, self._chunk_offsets(), strict=True) if c.completes)]

    @property
    def scored_at(self) -> list[tuple[Chunk, int]]:
        """Chunks asking for prompt logprobs, each with the first of its rows in the kept logits."""
        return [(c, at) for c, at in zip(self.chunks, self._chunk_offsets(), strict=True) if c.seq.params.prompt_logprobs]


@dataclass(frozen=True)
class Update:
    sent: list[tuple[Choice, Output]]  # what each consumer is sent, in order
    started: list[Choice]  # prompts complete this step: their first token is out (time to first token)


class Policy:
    def __init__(self, *, max_batch: int, step_tokens: int = 512, max_queue: int = 256, max_prefill: int = 8, eos: int | None = None,
                 kv_columns: int | None = None) -> None:
        self.max_batch, self.step_tokens, self.max_queue, self.max_prefill, self.eos = max_batch, step_tokens, max_queue, max_prefill, eos
        self.kv_columns = kv_columns  # None: no bound
        self.admitted = 0  # columns held by the sequences prefilling or running
        self.waiting: collections.deque[Choice] = collections.deque()
        self.running: list[Choice] = []
        self.prefilling: list[Choice] = []  # in arrival order; each in its own slot, `length` tokens of its prompt in the cache
        self.free_slots = self.prefill_slots()
        self.moves: list[Move] = []  # owed to the cache before the next step
        self._lock = threading.Lock()  # `waiting` is filled by request threads

    @property
    def slots(self) -> int:
        """Cache slots: the running rows' [0, max_batch), then one per prompt being prefilled."""
        return self.max_batch + self.max_prefill

    def prefill_slots(self) -> list[int]:
        return list(range(self.max_batch, self.slots))

    # --- the request side (any thread) ----------------------------------------

    def submit(self, choices: Seq[Choice]) -> None:
        """Queue every choice of a request, or none of them when the queue is full."""
        with self._lock:
            if len(self.waiting) + len(choices) > self.max_queue:
                raise QueueFullError(f"{len(self.waiting)} sequences are waiting (BAKEHOUSE_MAX_QUEUE={self.max_queue})", waiting=len(self.waiting),
                                     limit=self.max_queue)
            for seq in choices:
                seq.columns = cache_columns(len(seq.prompt) + seq.budget)
            self.waiting.extend(choices)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.prefilling)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self.prefilling)

    # --- the step -------------------------------------------------------------

    def schedule(self) -> StepPlan:
        dropped = self._drop_cancelled()
        budget = max(self.step_tokens - len(self.running), 32)
        with self._lock:
            while (self.waiting and self.free_slots and len(self.running) + len(self.prefilling) < self.max_batch
                   and budget > sum(len(s.prompt) - s.length for s in self.prefilling)
                   and (self.kv_columns is None or self.admitted + self.waiting[0].columns <= self.kv_columns)):
                seq = self.waiting.popleft()
                seq.slot, seq.length = self.free_slots.pop(0), 0
                self.admitted += seq.columns
                self.prefilling.append(seq)
        chunks = []
        for seq in self.prefilling:
            count = min(len(seq.prompt) - seq.length, budget)
            if count <= 0:
                break
            chunks.append(Chunk(seq, seq.slot, seq.length, count))
            budget -= count
        moves, self.moves = tuple(self.moves), []
        return StepPlan(moves, tuple(self.running), tuple(chunks), tuple(dropped))

    def update(self, plan: StepPlan, tokens: Seq[int | None], decode: Decode, *, logprobs: Mapping[int, TokenLogprob] | None = None,
               prompt_logprobs: Mapping[int, list[TokenLogprob]] | None = None, failed: str = "") -> Update:
        """The step ran: `tokens` holds one token for each of `plan.sampled`, None for a row whose sampling failed (it ends with
        `failed` as its error; the other rows go on); `logprobs` (by index into `sampled`) and `prompt_logprobs` (by index into
        `plan.chunks`) only for the rows that asked for them."""
        for s in plan.rows:
            s.length += 1
        started = []
        for i, c in enumerate(plan.chunks):
            seq = c.seq
            if seq.params.prompt_logprobs:
                if c.start == 0:
                    seq.prompt_logprobs.append(None)
                seq.prompt_logprobs += (prompt_logprobs or {}).get(i, [])
            seq.length += c.count
            if c.completes:
                self.prefilling.remove(seq)
                self.free_slots.append(c.slot)
                self.moves.append(Move(c.slot, len(self.running), seq.length))
                self.running.append(seq)
                started.append(seq)
        sent = [out for i, (seq, token) in enumerate(zip(plan.sampled, tokens, strict=True))
                for out in (self._advance(seq, token, (logprobs or {}).get(i), decode) if token is not None else self._error(seq, failed))]
        for i in reversed([i for i, s in enumerate(self.running) if s.finish is not None]):
            self._leave(i)
        return Update(sent, started)

    def fail(self, choices: Iterable[Choice], message: str) -> list[tuple[Choice, Output]]:
        """End these sequences with an error (what went wrong is for the log; the consumer gets `message`); the others go on."""
        sent = []
        for seq in list(choices):
            if seq.finish is not None:
                continue
            sent += self._error(seq, message)
            if seq in self.prefilling:
                self.prefilling.remove(seq)
                self.free_slots.append(seq.slot)
                self.admitted -= seq.columns
        for i in reversed([i for i, s in enumerate(self.running) if s.finish is not None]):
            self._leave(i)
        return sent

    # --- inside ---------------------------------------------------------------

    @staticmethod
    def _error(seq: Choice, message: str) -> list[tuple[Choice, Output]]:
        seq.finish = "error"
        return [(seq, Output("", tuple(seq.pending_ids), finish="error", error=message))]

    def _drop_cancelled(self) -> list[Choice]:
        with self._lock:
            gone = [s for s in self.waiting if s.cancelled.is_set()]
            for seq in gone:
                self.waiting.remove(seq)
        for seq in [s for s in self.prefilling if s.cancelled.is_set()]:
            gone.append(seq)
            self.prefilling.remove(seq)
            self.free_slots.append(seq.slot)
            self.admitted -= seq.columns
        for i in reversed([i for i, s in enumerate(self.running) if s.cancelled.is_set()]):
            gone.append(self.running[i])
            self._leave(i)
        return gone

    def _leave(self, i: int) -> None:
        """Row i ends; the last row takes its slot, so running rows stay in slots [0, n)."""
        last = len(self.running) - 1
        self.admitted -= self.running[i].columns
        if i != last:
            self.moves.append(Move(last, i, self.running[last].length))
            self.running[i] = self.running[last]
        self.running.pop()

    def _advance(self, seq: Choice, token: int, logprob: TokenLogprob | None, decode: Decode) -> list[tuple[Choice, Output]]:
        p = seq.params
        if logprob is not None:
            seq.pending_logprobs.append(TokenLogprob(logprob.token, logprob.logprob, logprob.top[: p.logprobs or 0]))
        seq.generated.append(token)
        seq.pending_ids.append(token)
        if token in p.stop_token_ids or (token == self.eos and not p.ignore_eos):
            seq.finish = "stop"
            return self._send(seq, final=True)
        seq.counts[token] += 1
        seq.next_token = token
        seq.text += decode(seq, token)
        cut = first_stop(seq.text, p.stop, seq.emitted)
        if cut is not None:
            seq.text, seq.finish = seq.text[:cut], "stop"
        elif len(seq.generated) >= seq.budget:
            seq.finish = "length"
        return self._send(seq, final=seq.finish is not None)

    def _send(self, seq: Choice, *, final: bool) -> list[tuple[Choice, Output]]:
        hold = 0 if final else stop_prefix(seq.text, seq.params.stop, seq.emitted)
        upto = len(seq.text) - hold
        first = tuple(seq.prompt_logprobs) if seq.params.prompt_logprobs and not seq.prompt_sent else None
        if not (upto > seq.emitted or final or seq.pending_logprobs or first is not None):
            return []
        out = Output(seq.text[seq.emitted : upto], tuple(seq.pending_ids), tuple(seq.pending_logprobs), seq.finish if final else None, first)
        seq.emitted, seq.pending_ids, seq.pending_logprobs, seq.prompt_sent = upto, [], [], True
        return [(seq, out)]


def first_stop(text: str, stops: Seq[str], since: int = 0) -> int | None:
    """Where the first stop string starts in `text` (searching from just before `since`), or None."""
    hits = [i for s in stops if s and (i := text.find(s, max(0, since - len(s)))) >= 0]
    return min(hits) if hits else None


def stop_prefix(text: str, stops: Seq[str], since: int) -> int:
    """How many trailing characters could be the start of a stop string: held back until the next token says."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - since), 0, -1):
            if text.endswith(s[:k]):
                longest = max(longest, k)
                break
    return longest
