"""A slotted KV cache: one slot per request, each with its own length, and steps that mix decode rows with prompt chunks.

transformers' own caches give every row of a batch the same length: a request
that joins late is padded to the oldest, and a finished one keeps its seat
until the whole batch ends. Here each slot holds one request's keys and
values at their own length. One forward pass (a `Step`) runs a packed batch of
tokens: first one new token for each running row (slots [0, rows), each at its
own column), then chunks of waiting prompts, each into its own slot. Every
layer's weights are read once for all of them: a decode step is bound by
reading the weights, so the running rows ride along with the prompts for
nothing. Running rows are kept in slots [0, n): when one ends, the last row's
keys move into its slot (one copy of that row), so the decode rows read plain
slices, never a gathered copy. The buffers grow (doubling) with the longest
row, so memory follows what is running, not the model's context.

It plugs into any transformers causal LM through the Cache API
(`past_key_values`) with explicit position ids, and one attention function
registered with transformers' AttentionInterface (`SLOT_ATTENTION`), which gets
the step through the forward pass's keyword arguments (`slot_step`): it splits
the packed queries and attends the decode rows as a batch over their slots,
and each prompt chunk over its own slot. The masks are made once per step,
not per layer.

Decode-row attention has two kernels, and which is faster depends on the CPU:
PyTorch's SDPA (its flash kernel) is 5-6x faster in bf16 on CPUs with AMX,
and 10x slower for one-token queries on a CPU without it (3.2 ms a layer for
32 rows of a 134 M Llama in bf16, against 0.3 ms for two batched matmuls).
`fastest_decode_attention` times both once at load.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

_GROW = 256

DecodeKernel = Literal["sdpa", "matmul"]


@dataclass(frozen=True)
class Segment:
    """A chunk of one prompt: `count` tokens into `slot`, from column `start`."""

    slot: int
    start: int
    count: int


@dataclass
class Step:
    """What one forward pass reads and writes: one token for each running row, then prompt chunks, packed in that order."""

    rows: int = 0
    lengths: torch.Tensor | None = None  # each decode row's length before this step (where its new token goes)
    segments: tuple[Segment, ...] = ()
    kernel: DecodeKernel = "sdpa"
    width: int = 0  # columns the buffers must hold
    decode_mask: torch.Tensor | None = None
    segment_masks: list[torch.Tensor | None] = field(default_factory=list)  # None: causal from column 0

    @property
    def tokens(self) -> int:
        return self.rows + sum(s.count for s in self.segments)


class SlotLayer(CacheLayerMixin):
    is_compileable = False
    keys: torch.Tensor  # allocated at the first update (lazy_initialization), as transformers' own layers
    values: torch.Tensor

    def __init__(self, step: Callable[[], Step], slots: int) -> None:
        super().__init__()
        self.step, self.slots, self.capacity = step, slots, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.heads, self.k_dim, self.v_dim = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.keys = torch.zeros((self.slots, self.heads, 0, self.k_dim), dtype=self.dtype, device=self.device)
        self.values = torch.zeros((self.slots, self.heads, 0, self.v_dim), dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def _reserve(self, width: int) -> None:
        if width <= self.capacity:
            return
        capacity = max(width, 2 * self.capacity, _GROW)
        self._resize(-(-capacity // _GROW) * _GROW, self.capacity)

    def fit(self, width: int) -> None:
        """Give memory back: when the longest row needs a quarter of the buffers or less, they shrink to twice what it needs."""
        if self.is_initialized and self.capacity > 4 * max(width, _GROW):
            self._resize(-(-2 * max(width, _GROW) // _GROW) * _GROW, width)

    def _resize(self, capacity: int, keep: int) -> None:
        keys = torch.zeros((self.slots, self.heads, capacity, self.k_dim), dtype=self.dtype, device=self.device)
        values = torch.zeros((self.slots, self.heads, capacity, self.v_dim), dtype=self.dtype, device=self.device)
        keys[:, :, :keep] = self.keys[:, :, :keep]
        values[:, :, :keep] = self.values[:, :, :keep]
        self.keys, self.values, self.capacity = keys, values, capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's new keys and values where each token belongs; attention reads the whole buffers (slot_attention slices them)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        s = self.step()
        self._reserve(s.width)
        n = s.rows
        if n:
            assert s.lengths is not None
            # Row i's new token goes to column lengths[i]: an index_put (scatter_ copies the whole cache in bf16 on CPU).
            rows = torch.arange(n, device=s.lengths.device)
            self.keys[rows, :, s.lengths] = key_states[0, :, :n].transpose(0, 1)
            self.values[rows, :, s.lengths] = value_states[0, :, :n].transpose(0, 1)
        at = n
        for seg in s.segments:
            self.keys[seg.slot, :, seg.start : seg.start + seg.count] = key_states[0, :, at : at + seg.count]
            self.values[seg.slot, :, seg.start : seg.start + seg.count] = value_states[0, :, at : at + seg.count]
            at += seg.count
        return self.keys, self.values

    def move(self, src: int, dst: int, length: int) -> None:
        if self.is_initialized and length:
            self.keys[dst, :, :length] = self.keys[src, :, :length]
            self.values[dst, :, :length] = self.values[src, :, :length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.step().width, 0

    def get_seq_length(self) -> int:
        return self.step().width

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The model's `past_key_values`: a SlotLayer per layer, all reading the current Step."""

    def __init__(self, num_layers: int, slots: int, kernel: DecodeKernel = "sdpa") -> None:
        self.current, self.kernel = Step(), kernel
        self.slot_layers = [SlotLayer(lambda: self.current, slots) for _ in range(num_layers)]
        super().__init__(layers=list[Any](self.slot_layers))  # Cache's own union of layer kinds varies across transformers releases

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (a row changing seats)."""
        for layer in self.slot_layers:
            layer.move(src, dst, length)

    def plan(self, lengths: torch.Tensor | None, segments: Sequence[Segment], dtype: torch.dtype, device: torch.device, *, occupied: int = 0) -> Step:
        """The next step: decode rows at `lengths` (slots [0, len)), then `segments`; its masks made once for every layer, on `device`.

        `occupied`: the longest sequence held in any slot (a prompt waiting for its next chunk included): the buffers never shrink below it.
        """
        rows = 0 if lengths is None else len(lengths)
        widths = [s.start + s.count for s in segments] + ([int(lengths.max()) + 1] if rows else [])  # type: ignore[union-attr]
        for layer in self.slot_layers:
            layer.fit(max(*widths, occupied))
        self.current = Step(rows, lengths if rows else None, tuple(segments), self.kernel, max(widths),
                            decode_mask(lengths, dtype) if rows else None,  # type: ignore[arg-type]
                            [prefill_mask(s.start, s.count, dtype, device) if s.start else None for s in segments])
        return self.current

    def positions(self, device: torch.device) -> torch.Tensor:
        """[1, tokens]: each packed token's position in its own sequence."""
        s = self.current
        parts = [s.lengths] if s.rows else []
        parts += [torch.arange(seg.start, seg.start + seg.count, device=device) for seg in s.segments]
        return torch.cat([p.to(device) for p in parts])[None]  # type: ignore[union-attr]


def decode_mask(lengths: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, 1, width]: row i sees its own first lengths[i] + 1 columns (its past and the token it adds now)."""
    width = int(lengths.max()) + 1
    columns = torch.arange(width, device=lengths.device)
    visible = columns[None, :] <= lengths[:, None]
    return _additive(visible, dtype)[:, None, None, :]


def prefill_mask(start: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, count, start + count]: each new token sees the row's past and the new tokens up to itself."""
    columns = torch.arange(start + count, device=device)
    rows = torch.arange(count, device=device) + start
    return _additive(columns[None, :] <= rows[:, None], dtype)[None, None]


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


def decode_attention(kernel: DecodeKernel, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One new token per row: query [rows, heads, 1, dim] over key/value [rows, kv_heads, width, dim] → [rows, heads, 1, dim]."""
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    if kernel == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads)
    # Each key head's query heads side by side: no repeated K/V for GQA.
    q = query.view(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(2, 3)) * scale + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).view(rows, heads, 1, dim)


SLOT_ATTENTION = "bakehouse_slots"


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                   dropout: float = 0.0, scaling: float | None = None, *, slot_step: Step, **kwargs: object) -> tuple[torch.Tensor, None]:
    """Attention for a packed step: query [1, heads, tokens, dim], key/value the layer's whole slot buffers; returns [1, tokens, heads, dim]."""
    s = slot_step
    heads, dim = query.shape[1], query.shape[-1]
    gqa = heads != key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    outs = []
    n = s.rows
    if n:
        assert s.decode_mask is not None
        width = s.decode_mask.shape[-1]
        q = query[0, :, :n].transpose(0, 1)[:, :, None]  # [rows, heads, 1, dim]
        outs.append(decode_attention(s.kernel, q, key[:n, :, :width], value[:n, :, :width], s.decode_mask, scale)[:, :, 0].transpose(0, 1))
    at = n
    for seg, mask in zip(s.segments, s.segment_masks, strict=True):
        end = seg.start + seg.count
        q = query[:, :, at : at + seg.count]
        k, v = key[seg.slot : seg.slot + 1, :, :end], value[seg.slot : seg.slot + 1, :, :end]
        outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)[0])
        at += seg.count
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [heads, tokens, dim]
    return out.transpose(0, 1)[None], None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)


def fastest_decode_attention(dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int, dim: int, rows: int = 16, width: int = 256) -> DecodeKernel:
    """Time both decode kernels on this machine, at one representative shape (a few ms, once at load)."""
    if device.type != "cpu":
        return "sdpa"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, heads, 1, dim, generator=g).to(dtype)
    kv = torch.randn(2, rows + 1, kv_heads, width + _GROW, dim, generator=g).to(dtype)
    k, v = kv[0, :rows, :, :width], kv[1, :rows, :, :width]  # strided, like the cache's slices
    mask = decode_mask(torch.full((rows,), width - 1), dtype)
    best: dict[DecodeKernel, float] = {}
    with torch.inference_mode():
        for kernel in ("sdpa", "matmul"):
            decode_attention(kernel, q, k, v, mask, dim**-0.5)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                decode_attention(kernel, q, k, v, mask, dim**-0.5)
                times.append(time.perf_counter() - t0)
            best[kernel] = min(times)
    return min(best, key=best.__getitem__)
