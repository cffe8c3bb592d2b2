"""A slotted KV cache: one slot per request, each with its own length, and steps that mix decode rows with prompt chunks.

transformers' own caches give every row of a batch the same length: a request
that joins late is padded to the oldest, and a finished one keeps its seat
until the whole batch ends. Here each slot holds one request's keys and
values at their own length, in a row of a tier sized for it (app.seats): a
4 k-token request takes one 4 k row, the short ones keep their 256-column
rows. One forward pass (a `Step`) runs a packed batch of tokens: first one
new token for each running row (each at its own column), then chunks of
waiting prompts, each into its own slot. Every layer's weights are read once
for all of them: a decode step is bound by reading the weights, so the
running rows ride along with the prompts for nothing.

It plugs into any transformers causal LM through the Cache API
(`past_key_values`) with explicit position ids, and one attention function
registered with transformers' AttentionInterface (`SLOT_ATTENTION`), which gets
the step through the forward pass's keyword arguments (`slot_step`): it splits
the packed queries and attends the decode rows tier by tier, each tier's rows
as one batch over its first columns (up to that tier's longest row), and each
prompt chunk over its own row. The masks are made once per step, not per
layer.

Decode-row attention has two kernels, and the keys and values can be kept in
the model's dtype or in fp32; which is fastest depends on the CPU. PyTorch's
SDPA (its flash kernel) is 5-6x faster in bf16 on CPUs with AMX; on an AMD
EPYC without AMX every bf16 kernel for one-token queries is 2.5-6x slower
than fp32 (32 rows of 12 heads over 380 columns: 8.3 ms in bf16, 3.4 ms in
fp32), while the linear layers are 2x faster in bf16. So a bf16 model may
keep an fp32 cache: its attention runs in fp32 (the query cast up, the
output cast back; a few KB a step), at twice the cache's memory.
`fastest_decode_attention` times each kernel once at load (the median of 7
runs) and keeps the fastest: with the cache in fp32 and, on a CPU with AMX
(or a GPU), in the model's dtype too. Without AMX a bf16 cache is not timed:
it lost on every CPU measured, and timing its slow kernels was 60 % of the
choice's 0.4 s at load (16 heads, 2 cores).

A third kernel, `compiled`, is `upcast_attention` compiled by torch.compile
(inductor's C++ on CPU): it reads a bf16 cache and computes in fp32 in
registers, so it reads half the bytes of an fp32 cache at fp32's speed. A
decode step over long rows is bound by reading the cache, and on the AMD EPYC
above it cut a mixed load's attention by a third. Compiling takes seconds, so
it is never done before ready: app.tuning compiles and times it in the
background and the scheduler switches to it between two steps when it wins.
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from app.precision import cpu_flags, median_seconds
from app.seats import COLUMNS, Copy, Seats, Span, Tier

DecodeKernel = Literal["sdpa", "matmul", "compiled"]


@dataclass(frozen=True)
class DecodeChoice:
    """How decode rows attend: the kernel, and the dtype the keys and values are kept in."""

    kernel: DecodeKernel = "sdpa"
    kv_dtype: torch.dtype | None = None  # None: the model's own

    def describe(self) -> str:
        return self.kernel + (f", {str(self.kv_dtype).removeprefix('torch.')} cache" if self.kv_dtype is not None else "")


@dataclass(frozen=True)
class Shape:
    """The attention shapes of one model: query heads, key/value heads, head size, in the model's dtype."""

    @classmethod
    def of(cls, config: Any, dtype: torch.dtype) -> Shape:
        """From a transformers config: GQA's key/value heads and an explicit head size where the config has them."""
        heads = int(config.num_attention_heads)
        return cls(heads, int(getattr(config, "num_key_value_heads", None) or heads), int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                   dtype)

    heads: int
    kv_heads: int
    dim: int
    dtype: torch.dtype


_SLACK = 1.25  # a tier grows its rows by a quarter at a time; trimmed when it holds less than half of them


@dataclass(frozen=True)
class Segment:
    """A chunk of one prompt: `count` tokens into `slot`, from column `start`."""

    slot: int
    start: int
    count: int


@dataclass(frozen=True)
class Group:
    """The decode rows held by one tier: rows [0, len(rows)) of it, row j being decode row `rows[j]`."""

    tier: Tier
    rows: torch.Tensor  # each tier row's place among the step's decode rows
    index: torch.Tensor  # 0..len(rows)-1: the tier rows written, made once a step rather than once a layer
    lengths: torch.Tensor  # each tier row's length before this step (where its new token goes)
    mask: torch.Tensor  # [rows, 1, 1, width]

    @property
    def width(self) -> int:
        return int(self.mask.shape[-1])


@dataclass
class Step:
    """What one forward pass reads and writes: one token for each running row, then prompt chunks, packed in that order."""

    rows: int = 0
    lengths: torch.Tensor | None = None  # each decode row's length before this step (where its new token goes)
    groups: tuple[Group, ...] = ()
    in_order: bool = True  # one group whose rows are decode rows 0..n-1 in order: no gather, no scatter
    spans: tuple[Span, ...] = ()
    kernel: DecodeKernel = "sdpa"
    kv_dtype: torch.dtype | None = None  # the cache's, when not the model's: attention runs in it
    width: int = 0  # the longest sequence this step
    segment_masks: list[torch.Tensor | None] = field(default_factory=list)  # None: causal from column 0

    @property
    def tokens(self) -> int:
        return self.rows + sum(s.count for s in self.spans)


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values: a [rows, heads, columns, dim] buffer per tier, rows as the seats say."""

    is_compileable = False

    def __init__(self, step: Callable[[], Step], seats: Seats, slots: int) -> None:
        super().__init__()
        self.step, self.seats, self.slots = step, seats, slots
        self.tier_keys: dict[Tier, torch.Tensor] = {}  # not CacheLayerMixin's keys/values: those are one tensor
        self.tier_values: dict[Tier, torch.Tensor] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = self.step().kv_dtype or key_states.dtype, key_states.device
        self.heads, self.k_dim, self.v_dim = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.is_initialized = True

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.tier_keys.values(), *self.tier_values.values()))

    def _room(self, tier: Tier, rows: int) -> None:
        """Make `tier` hold at least `rows` rows (a quarter more than before when it grows), its rows kept."""
        have = self.tier_keys[tier].shape[0] if tier in self.tier_keys else 0
        if rows > have:
            self._resize(tier, min(max(rows, int(have * _SLACK) + 1), max(self.slots, rows)), have)

    def _resize(self, tier: Tier, rows: int, keep: int) -> None:
        keys = torch.zeros((rows, self.heads, tier.columns, self.k_dim), dtype=self.dtype, device=self.device)
        values = torch.zeros((rows, self.heads, tier.columns, self.v_dim), dtype=self.dtype, device=self.device)
        if keep:
            keys[:keep] = self.tier_keys[tier][:keep]
            values[:keep] = self.tier_values[tier][:keep]
        self.tier_keys[tier], self.tier_values[tier] = keys, values

    def retype(self, dtype: torch.dtype) -> None:
        """Keep the keys and values in `dtype` from now on, those held converted (between steps)."""
        if not self.is_initialized:
            return  # the first step's keys set it (lazy_initialization)
        self.dtype = dtype
        for tiers in (self.tier_keys, self.tier_values):
            for tier, t in tiers.items():
                tiers[tier] = t.to(dtype)

    def apply(self, ops: Sequence[Copy]) -> None:
        """Make the seats' copies, in order; then give back what no row uses."""
        if not self.is_initialized:
            return  # nothing written yet: nothing to copy
        for op in ops:
            self._room(op.dst, op.dst_row + 1)
            self.tier_keys[op.dst][op.dst_row, :, : op.length] = self.tier_keys[op.src][op.src_row, :, : op.length]
            self.tier_values[op.dst][op.dst_row, :, : op.length] = self.tier_values[op.src][op.src_row, :, : op.length]
        for tier in list(self.tier_keys):
            used = len(self.seats.rows.get(tier, ()))
            if not used:
                del self.tier_keys[tier], self.tier_values[tier]
            elif self.tier_keys[tier].shape[0] > 2 * used:
                self._resize(tier, used, used)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[Any, Any]:
        """Write the step's new keys and values where each token belongs; attention reads the tiers (slot_attention)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        s = self.step()
        key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        for tier, slots in self.seats.rows.items():
            self._room(tier, len(slots))
        for g in s.groups:
            # Row j's new token goes to column lengths[j]: an index_put (scatter_ copies the whole buffer in bf16 on CPU).
            new_k, new_v = key_states[0, :, : s.rows], value_states[0, :, : s.rows]
            if not s.in_order:
                new_k, new_v = new_k[:, g.rows], new_v[:, g.rows]
            self.tier_keys[g.tier][g.index, :, g.lengths] = new_k.transpose(0, 1)
            self.tier_values[g.tier][g.index, :, g.lengths] = new_v.transpose(0, 1)
        at = s.rows
        for sp in s.spans:
            self.tier_keys[sp.tier][sp.row, :, sp.start : sp.start + sp.count] = key_states[0, :, at : at + sp.count]
            self.tier_values[sp.tier][sp.row, :, sp.start : sp.start + sp.count] = value_states[0, :, at : at + sp.count]
            at += sp.count
        return self.tier_keys, self.tier_values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.step().width, 0

    def get_seq_length(self) -> int:
        return self.step().width

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The model's `past_key_values`: a SlotLayer per layer, all reading the current Step and sharing one Seats."""

    def __init__(self, num_layers: int, slots: int, decode: DecodeChoice = DecodeChoice()) -> None:
        self.current, self.decode, self.seats = Step(), decode, Seats()
        self.slot_layers = [SlotLayer(lambda: self.current, self.seats, slots) for _ in range(num_layers)]
        super().__init__(layers=list[Any](self.slot_layers))  # Cache's own union of layer kinds varies across transformers releases

    @property
    def nbytes(self) -> int:
        """What the keys and values take now, every layer."""
        return sum(layer.nbytes for layer in self.slot_layers)

    def switch(self, decode: DecodeChoice, model_dtype: torch.dtype) -> None:
        """Decode rows attend with `decode` from the next step on; the keys and values held are converted to its cache's dtype.

        Exact from a wider cache to the model's own dtype: every key and value was computed in the model's dtype.
        """
        self.decode = decode
        for layer in self.slot_layers:
            layer.retype(decode.kv_dtype or model_dtype)

    def move(self, src: int, dst: int) -> None:
        """Slot `dst` takes over slot `src` (a row changing slots): renamed, not copied."""
        self._apply(self.seats.move(src, dst))

    def _apply(self, ops: Sequence[Copy]) -> None:
        for layer in self.slot_layers:
            layer.apply(ops)

    def plan(self, lengths: torch.Tensor | None, segments: Sequence[Segment], dtype: torch.dtype, device: torch.device, *,
             live: Collection[int] | None = None) -> Step:
        """The next step: decode rows at `lengths` (slots [0, len)), then `segments`; seats found, masks made once for every layer, on `device`.

        `live`: the slots of prompts under way (a prompt waiting for its next chunk included); any other prompt's row is given back.
        """
        listed = [] if lengths is None else lengths.tolist()
        dtype = self.decode.kv_dtype or dtype
        self._apply(self.seats.plan(listed, [(s.slot, s.start, s.count) for s in segments], live))
        groups = []
        if lengths is not None:
            for tier, slots in self.seats.decode_tiers():
                rows = torch.tensor(slots, device=lengths.device)
                groups.append(Group(tier, rows, torch.arange(len(slots), device=lengths.device), lengths[rows], decode_mask(lengths[rows], dtype)))
        in_order = len(groups) <= 1 and all(g.rows.tolist() == list(range(len(listed))) for g in groups)
        widths = [s.start + s.count for s in segments] + ([max(listed) + 1] if listed else [])
        self.current = Step(len(listed), lengths if listed else None, tuple(groups), in_order,
                            tuple(self.seats.span(s.slot, s.start, s.count) for s in segments), self.decode.kernel, self.decode.kv_dtype,
                            max(widths, default=0),
                            [prefill_mask(s.start, s.count, dtype, device) if s.start else None for s in segments])
        return self.current

    def positions(self, device: torch.device) -> torch.Tensor:
        """[1, tokens]: each packed token's position in its own sequence."""
        s = self.current
        parts = [s.lengths] if s.rows else []
        parts += [torch.arange(sp.start, sp.start + sp.count, device=device) for sp in s.spans]
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


def upcast_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention in fp32 over keys and values in any dtype, read over the first rows and columns (decode_attention's shapes):
    what `compiled` compiles."""
    rows, heads, _, dim = query.shape
    key, value = key[:rows, :, : mask.shape[-1]], value[:rows, :, : mask.shape[-1]]
    kv_heads = key.shape[1]
    q = query.float().view(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.float().transpose(2, 3)) * scale + mask.float()
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value.float()).view(rows, heads, 1, dim).to(query.dtype)


def inductor_cache_dir(home: Path | None, uid: int) -> Path:
    """Where torch.compile keeps (and loads) its compiled kernels: TORCHINDUCTOR_CACHE_DIR when the operator set it, else a directory of
    this user's own, ~/.cache/bakehouse/torchinductor (mode 0700), else a new one made for this process.

    Not torch's default, /tmp/torchinductor_<user>: anyone on the machine can create that path before this server does, and every
    shared library in it is loaded into the server. A path that is a link, someone else's or open to others is not used.
    """
    if configured := os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(configured)
    try:
        if home is None:
            raise FileNotFoundError("no home directory")
        own = home / ".cache" / "bakehouse" / "torchinductor"
        own.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(own)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077:
            return own
    except OSError:
        pass  # no home, or a read-only one (an image's): a directory of this process's own below
    return Path(tempfile.mkdtemp(prefix="bakehouse-torchinductor-"))


@functools.cache
def compiled_upcast_attention() -> Callable[..., torch.Tensor]:
    """`upcast_attention` under torch.compile, made once per process: it compiles on its first calls (app.tuning makes those)."""
    try:
        home: Path | None = Path.home()
    except RuntimeError:  # no HOME and no passwd entry
        home = None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir(home, os.getuid()))  # read by inductor when it compiles
    import torch._dynamo.config as dynamo  # here: torch's compiler is imported only where a kernel is compiled
    import torch._inductor.config as inductor

    inductor.compile_threads = 1  # no pool of worker processes forked from a serving process
    dynamo.recompile_limit = 64  # a graph per dtype, head layout and row counts of one or more: more than the default 8 in a process of many models
    return torch.compile(upcast_attention, dynamic=True)


def decode_attention(kernel: DecodeKernel, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One new token per row: query [rows, heads, 1, dim] over the first rows and `width` columns of key/value [>= rows, kv_heads,
    >= width, dim], width being the mask's [rows, 1, 1, width] → [rows, heads, 1, dim].

    The cache's whole tier buffers are passed, not slices of them: the compiled kernel then sees one layout (contiguous, from offset
    0) whatever the step, and torch.compile's guards hold from one step to the next instead of asking for a new graph.
    """
    if kernel == "compiled":  # the query in one layout too (in step order it is a strided view; one row's view passes for contiguous): a few KB
        return compiled_upcast_attention()(query.clone(memory_format=torch.contiguous_format), key, value, mask, scale)
    rows, heads, _, dim = query.shape
    key, value = key[:rows, :, : mask.shape[-1]], value[:rows, :, : mask.shape[-1]]
    kv_heads = key.shape[1]
    if kernel == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads)
    # Each key head's query heads side by side: no repeated K/V for GQA.
    q = query.view(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(2, 3)) * scale + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).view(rows, heads, 1, dim)


SLOT_ATTENTION = "bakehouse_slots"


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: dict[Tier, torch.Tensor], value: dict[Tier, torch.Tensor],
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, *, slot_step: Step,
                   **kwargs: object) -> tuple[torch.Tensor, None]:
    """Attention for a packed step: query [1, heads, tokens, dim], key/value the layer's tiers; returns [1, tokens, heads, dim]."""
    s = slot_step
    heads, dim = query.shape[1], query.shape[-1]
    scale = scaling if scaling is not None else dim**-0.5
    model_dtype = query.dtype
    if s.kv_dtype is not None:
        query = query.to(s.kv_dtype)
    outs = []
    n = s.rows
    if n:
        q_all = query[0, :, :n].transpose(0, 1)[:, :, None]  # [rows, heads, 1, dim]
        decoded = q_all.new_empty((n, heads, dim)) if not s.in_order else None
        for g in s.groups:
            out = decode_attention(s.kernel, q_all if decoded is None else q_all[g.rows], key[g.tier], value[g.tier], g.mask, scale)[:, :, 0]
            if decoded is None:
                outs.append(out.transpose(0, 1))
            else:
                decoded[g.rows] = out
        if decoded is not None:
            outs.append(decoded.transpose(0, 1))
    at = n
    for sp, mask in zip(s.spans, s.segment_masks, strict=True):
        end = sp.start + sp.count
        q = query[:, :, at : at + sp.count]
        k, v = key[sp.tier][sp.row : sp.row + 1, :, :end], value[sp.tier][sp.row : sp.row + 1, :, :end]
        outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                                     enable_gqa=heads != k.shape[1])[0])
        at += sp.count
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [heads, tokens, dim]
    return out.transpose(0, 1)[None].to(model_dtype), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)


def decode_inputs(shape: Shape, dtype: torch.dtype, rows: int, width: int, seed: int = 0, capacity: int | None = None,
                  columns: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random query, keys, values and mask in `dtype` as slot_attention passes them to a decode kernel (to time or compile one): the
    keys and values a tier's whole buffers, `capacity` rows (rows + 1 when None) of `columns` (256 more than the width when None).
    Under inference mode they are inference tensors, as a step's are: torch.compile tells the two kinds apart."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, shape.heads, 1, shape.dim, generator=g).to(dtype)
    keys, values = (torch.randn(capacity or rows + 1, shape.kv_heads, columns or width + COLUMNS, shape.dim, generator=g).to(dtype)
                    for _ in range(2))
    return query, keys, values, decode_mask(torch.full((rows,), width - 1), dtype)


def fastest_decode_attention(shape: Shape, device: torch.device, rows: int = 16, width: int = 256, amx: bool | None = None) -> DecodeChoice:
    """Time each kernel with the cache in fp32 and, on a CPU with AMX (`amx`: None reads the CPU's flags), in the model's reduced
    precision too; the fastest, by the median of 7 runs at one representative shape (once at load)."""
    if device.type != "cpu":
        return DecodeChoice("sdpa")
    if shape.dtype == torch.float32:
        kv_dtypes: tuple[torch.dtype | None, ...] = (None,)
    elif amx if amx is not None else "amx_bf16" in cpu_flags():
        kv_dtypes = (None, torch.float32)
    else:
        kv_dtypes = (torch.float32,)
    times: dict[DecodeChoice, float] = {}
    with torch.inference_mode():
        for kv_dtype in kv_dtypes:
            q, k, v, mask = decode_inputs(shape, kv_dtype or shape.dtype, rows, width)
            for kernel in ("sdpa", "matmul"):
                choice = DecodeChoice(kernel, kv_dtype)
                times[choice] = median_seconds(lambda: decode_attention(kernel, q, k, v, mask, shape.dim**-0.5), runs=7)  # noqa: B023
    return min(times, key=times.__getitem__)
