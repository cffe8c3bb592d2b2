"""Per-request sampling over one batch of logits: every row keeps its own settings.

Greedy at temperature 0; otherwise penalties (presence, frequency,
repetition), temperature, top-k, top-p and min-p, then a draw, from the row's
own generator when the request gave a seed (the same seed gives the same
text). Logprobs are those of the model's own distribution (before any of the
above), as OpenAI-compatible servers report them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import torch

from app.params import SamplingParams, TokenLogprob
from ops.errors import SamplingError


class Row(Protocol):
    """What sampling needs to know of one running sequence (app.policy.Choice)."""

    params: SamplingParams
    prompt: list[int]
    generated: list[int]
    counts: Counter[int]
    generator: torch.Generator | None


def blocked(row: Row, eos: int | None) -> list[int]:
    """Tokens that may not end the text yet (min_tokens), or ever (ignore_eos)."""
    p = row.params
    out = {eos} if p.ignore_eos and eos is not None else set()
    if len(row.generated) < p.min_tokens:
        out |= ({eos} if eos is not None else set()) | set(p.stop_token_ids)
    return sorted(out)


def _penalize(logits: torch.Tensor, row: Row) -> None:
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt) | set(row.generated)), dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if row.counts and (p.presence_penalty or p.frequency_penalty):
        ids = torch.tensor(list(row.counts), dtype=torch.long, device=logits.device)
        counts = torch.tensor(list(row.counts.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts


def _truncate(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > p.top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    return probs


def sample(logits: torch.Tensor, rows: Sequence[Row], eos: int | None) -> tuple[list[int | None], dict[int, Exception]]:
    """One token per row from `logits` [rows, vocab] (float32): greedy rows without penalties in one argmax, the others one by one.

    A row whose sampling fails gets None and its exception in the second map; the other rows are not touched by it.
    """
    chosen: list[int | None] = [0] * len(rows)
    failed: dict[int, Exception] = {}
    plain = [i for i, r in enumerate(rows) if r.params.greedy and not r.params.penalized]
    if plain:
        x = logits[plain]
        banned = [(j, t) for j, i in enumerate(plain) for t in blocked(rows[i], eos)]
        if banned:
            x[[j for j, _ in banned], [t for _, t in banned]] = float("-inf")
        for i, token in zip(plain, x.argmax(dim=-1).tolist(), strict=True):
            chosen[i] = token
    for i in sorted(set(range(len(rows))) - set(plain)):
        try:
            chosen[i] = _one(logits[i], rows[i], eos)
        except (RuntimeError, ValueError) as exc:
            chosen[i], failed[i] = None, exc
    return chosen, failed


def _one(logits: torch.Tensor, row: Row, eos: int | None) -> int:
    x = logits.clone()
    blocked_ids = blocked(row, eos)
    if blocked_ids:
        x[blocked_ids] = float("-inf")
    _penalize(x, row)
    if row.params.greedy:
        return int(x.argmax())
    probs = _truncate(x / row.params.temperature, row.params)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise SamplingError("the sampling settings left no valid probabilities")
    return int(torch.multinomial(probs, 1, generator=row.generator))


def logprobs_of(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """The model's logprob of each chosen token (one per row of `logits`) and its `top` alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None]).squeeze(-1).tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(tokens)
    if top:
        values, ids = logp.topk(top, dim=-1)
        tops = [tuple(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(ids, values, strict=True)]
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(tokens, picked, tops, strict=True)]
