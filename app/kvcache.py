"""A slotted KV cache: one slot per running request, each with its own length, for continuous batching.

transformers' own caches give every row of a batch the same length: a request
that joins late is padded to the oldest, and a finished one keeps its seat
until the whole batch ends. Here each slot holds one request's keys and
values at their own length; a decode step writes each row's new token at that
row's own column (one indexed write per layer), and attention reads only up to the
longest *running* row, under a mask that hides each row's unused columns.
Running rows are kept in slots [0, n): when one ends, the last row's keys move
into its slot (one copy of that row), so a decode step reads plain slices,
never a gathered copy. A request's prompt is prefilled into the next slot
chunk by chunk, between decode steps. The buffers grow (doubling) with the
longest row, so memory follows what is running, not the model's context.

It plugs into any transformers causal LM through the Cache API
(`past_key_values`), with an explicit 4D attention mask and position ids,
which transformers uses as given, and one attention function registered with
transformers' AttentionInterface (`SLOT_ATTENTION`): prompt chunks go to
PyTorch's SDPA; a decode step (one new token per row) runs as two batched
matmuls, because the CPU flash kernel spends most of a step on one-token
queries over the cache's strided slices (3.2 ms a layer for 32 rows of a
134 M Llama in bf16, against 0.3 ms for the matmuls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

_GROW = 256


@dataclass
class View:
    """What the next forward pass reads and writes: running rows [0, rows) one token each, or one slot's prompt chunk."""

    rows: int = 0
    lengths: torch.Tensor | None = None  # decode: each row's length before this step (where its new token goes)
    slot: int = -1  # prefill: the slot being filled, from column `start`
    start: int = 0
    width: int = 0  # key length attention reads


class SlotLayer(CacheLayerMixin):
    is_compileable = False

    def __init__(self, view: View, slots: int):
        super().__init__()
        self.view, self.slots, self.capacity = view, slots, 0

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
        capacity = -(-capacity // _GROW) * _GROW
        keys = torch.zeros((self.slots, self.heads, capacity, self.k_dim), dtype=self.dtype, device=self.device)
        values = torch.zeros((self.slots, self.heads, capacity, self.v_dim), dtype=self.dtype, device=self.device)
        keys[:, :, : self.capacity] = self.keys
        values[:, :, : self.capacity] = self.values
        self.keys, self.values, self.capacity = keys, values, capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        v = self.view
        self._reserve(v.width)
        if v.slot >= 0:
            end = v.start + key_states.shape[2]
            self.keys[v.slot, :, v.start : end] = key_states[0]
            self.values[v.slot, :, v.start : end] = value_states[0]
            return self.keys[v.slot : v.slot + 1, :, :end], self.values[v.slot : v.slot + 1, :, :end]
        assert v.lengths is not None
        n = v.rows
        # Row i's new token goes to column lengths[i]: an index_put (scatter_ copies the whole cache in bf16 on CPU).
        rows = torch.arange(n, device=v.lengths.device)
        self.keys[rows, :, v.lengths] = key_states[:, :, 0]
        self.values[rows, :, v.lengths] = value_states[:, :, 0]
        return self.keys[:n, :, : v.width], self.values[:n, :, : v.width]

    def move(self, src: int, dst: int, length: int) -> None:
        if self.is_initialized and length:
            self.keys[dst, :, :length] = self.keys[src, :, :length]
            self.values[dst, :, :length] = self.values[src, :, :length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.view.width, 0

    def get_seq_length(self) -> int:
        return self.view.width

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The model's `past_key_values`: a SlotLayer per layer, all reading the same View."""

    def __init__(self, num_layers: int, slots: int):
        self.view = View()
        super().__init__(layers=[SlotLayer(self.view, slots) for _ in range(num_layers)])

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (a row changing seats)."""
        for layer in self.layers:
            layer.move(src, dst, length)  # type: ignore[attr-defined]

    def decoding(self, lengths: torch.Tensor) -> None:
        self.view.rows, self.view.lengths, self.view.slot = len(lengths), lengths, -1
        self.view.width = int(lengths.max()) + 1

    def prefilling(self, slot: int, start: int, count: int) -> None:
        self.view.slot, self.view.start, self.view.width = slot, start, start + count


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


SLOT_ATTENTION = "bakehouse_slots"


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                   dropout: float = 0.0, scaling: float | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """SDPA for prompt chunks; for a decode step, softmax(q k^T + mask) v with each key head's query heads side by side (no repeated K/V)."""
    batch, heads, q_len, dim = query.shape
    if q_len != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    q = query.view(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(2, 3)) * (scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).view(batch, heads, 1, dim)
    return out.transpose(1, 2), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
