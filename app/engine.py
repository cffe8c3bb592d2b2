"""The transformers engine: a verified model directory (app.loader) on its device, and one forward pass over the slotted cache.

Loaded with `local_files_only=True`: the engine never talks to a hub.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from app.device import DevicePlan, device_plan
from app.kvcache import SLOT_ATTENTION, Segment, Shape, SlotCache, fastest_decode_attention
from app.packed import linears_to_pack
from app.precision import PASSAGE, PrecisionCheck, compare

log = logging.getLogger("bakehouse.engine")


class Engine:
    """The model and its tokenizer on their device, and one forward pass over the slotted cache (app.kvcache)."""

    def __init__(self, directory: Path, *, name: str, safetensors_only: bool = True, plan: DevicePlan | None = None) -> None:
        self.name = name
        self.plan = plan or device_plan()
        start = time.monotonic()
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(directory, local_files_only=True)

        def load(dtype: torch.dtype) -> PreTrainedModel:
            model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, use_safetensors=safetensors_only or None,
                                                                          dtype=dtype, attn_implementation=SLOT_ATTENTION)
            return model.to(self.plan.device).eval()  # type: ignore[arg-type]  # transformers types .to() for its own wrapper

        self.model = load(self.plan.dtype)
        config = self.model.config
        self.context = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)
        self.num_layers = int(config.num_hidden_layers)
        # transformers renamed `past_key_values` to `cache` (5.24); vLLM's environment may hold an older one
        self.cache_argument = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.eos = self.tokenizer.eos_token_id
        self.device, self.dtype = torch.device(self.plan.device), self.plan.dtype
        self.precision: PrecisionCheck | None = None
        if self.plan.try_bf16:
            self.precision = self._check_bf16()
            log.info("%s: %s", name, self.precision.describe())
            if not self.precision.passed:
                self.model, self.dtype = load(torch.float32), torch.float32
        self.pending = linears_to_pack(self.model, self.dtype, self.device)  # packed by the scheduler between steps, after ready
        self.load_seconds = time.monotonic() - start
        self.shape = Shape.of(config, self.dtype)
        self.attention = fastest_decode_attention(self.shape, self.device)
        memory = f", {torch.cuda.memory_allocated() / 1e9:.2f} GB GPU memory" if self.plan.device == "cuda" else ""
        log.info("loaded %s from %s on %s (%s, decode attention: %s, linear layers to pack: %d) in %.2fs%s", name, directory, self.plan.device,
                 str(self.dtype).removeprefix("torch."), self.attention.describe(), len(self.pending.layers), self.load_seconds, memory)

    def _check_bf16(self) -> PrecisionCheck:
        """The passage through the model in fp32, then in bf16 (the model is bf16 afterwards)."""
        ids = self.encode(PASSAGE)[: self.context]

        def logits(tokens: list[int] = ids) -> torch.Tensor:
            cache = SlotCache(self.num_layers, 1)
            cache.plan(None, [Segment(0, 0, len(tokens))], self.dtype, self.device)
            with torch.inference_mode():
                return self.forward(tokens, cache, torch.arange(len(tokens)))

        def to_bf16() -> None:
            self.model.to(torch.bfloat16)  # type: ignore[arg-type]
            self.dtype = torch.bfloat16

        return compare(logits, to_bf16, lambda: logits(ids[:16]))

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token in every layer: what one column of one cache slot costs."""
        return 2 * self.num_layers * self.shape.kv_heads * self.shape.dim * torch.finfo(self.attention.kv_dtype or self.dtype).bits // 8

    def kv_budget(self, gb: float | None) -> int:
        """The KV cache's budget in bytes: BAKEHOUSE_KV_CACHE_GB, else half the GPU memory free after loading, or a quarter of this machine's memory."""
        if gb is not None:
            return int(gb * 1e9)
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info()[0] * 0.5)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.25)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The tokenizer's chat template; without one, 'role: content' lines and 'assistant:'."""
        if self.tokenizer.chat_template:
            return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def forward(self, ids: Sequence[int], cache: SlotCache, keep: torch.Tensor) -> torch.Tensor:
        """Logits [len(keep), vocab] at the kept positions of one packed step (`cache.current`: decode rows, then prompt chunks)."""
        out = self.model(input_ids=torch.tensor(list(ids), device=self.device)[None], position_ids=cache.positions(self.device), use_cache=True,
                         logits_to_keep=keep, slot_step=cache.current, **{self.cache_argument: cache})
        return out.logits[0]
