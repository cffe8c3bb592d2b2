"""Load a verified model and generate for a batch of requests in shared forward passes.

The model is loaded only from `$MODELS_DIR/<name>/<commit>` after a quick
verify against models.lock, with `local_files_only=True`: the engine never
talks to a hub.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ops.errors import BakehouseError, ConfigError
from ops.models.lock import LockedModel, load_lock
from ops.models.store import Store
from ops.models.verify import PICKLE_SUFFIXES, verify_one

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger("bakehouse.engine")


class NotServableError(BakehouseError):
    """The store holds nothing this engine may load; the message says why and what to do."""


@dataclass(frozen=True)
class DevicePlan:
    device: str
    dtype: torch.dtype


def pick_device(cuda_available: bool, bf16_supported: bool) -> DevicePlan:
    """CUDA in bf16 where supported, else fp16; CPU in fp32."""
    if cuda_available:
        return DevicePlan("cuda", torch.bfloat16 if bf16_supported else torch.float16)
    return DevicePlan("cpu", torch.float32)


def check_weights_format(model: LockedModel, allow_pickle: bool) -> bool:
    """True when the model must be loaded from safetensors; refuse pickle-only weights unless allowed."""
    names = [f.path for f in model.files]
    if any(n.endswith(".safetensors") for n in names):
        return True
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles and not (allow_pickle or model.allow_pickle):
        raise NotServableError(
            f"{model.name}: only pickle weights ({', '.join(pickles)}), which can run code when loaded. "
            "Convert them to safetensors, or set allow_pickle = true in models.toml (or BAKEHOUSE_ALLOW_PICKLE=1) if you trust them."
        )
    return False


def verified_path(store: Store, lock_path: Path, name: str) -> tuple[LockedModel, Path]:
    """Quick-verify the locked commit; return the directory to load (never `current` itself, which may flip)."""
    try:
        model = load_lock(lock_path).select([name])[0]
    except ConfigError as exc:
        raise NotServableError(str(exc)) from exc
    outcome = verify_one(store, model, full=False)
    if not outcome.ok:
        reasons = "; ".join(outcome.problems) or outcome.error or "verification failed"
        raise NotServableError(f"refusing to load {name}: {reasons}")
    return model, store.commit_dir(name, model.commit)


@dataclass(frozen=True)
class Loaded:
    engine: Engine
    verify_seconds: float
    warmup_seconds: float


def load_verified(settings: Settings, on_state: Callable[[str, str], None] = lambda state, reason: None) -> Loaded:
    """The one way the app gets a model: wait for a fetch in progress, quick verify, check the format, load, warm up."""
    store = Store(settings.models_dir)
    on_state("waiting", f"waiting for a fetch of {settings.model} in progress")
    with store.reading(settings.model):
        on_state("verifying", f"verifying {settings.model}")
        t0 = time.monotonic()
        model, directory = verified_path(store, settings.lock, settings.model)
        verify_seconds = time.monotonic() - t0
        safetensors_only = check_weights_format(model, settings.allow_pickle)
        on_state("loading", f"loading {settings.model} from {directory}")
        engine = Engine(directory, name=settings.model, safetensors_only=safetensors_only)
    on_state("warming", "warming up")
    t0 = time.monotonic()
    engine.warm_up()
    return Loaded(engine, verify_seconds, time.monotonic() - t0)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Row:
    """One request inside a batch."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: Sequence[str]
    emit: Callable[[str, str | None], None]  # (text delta, finish_reason or None)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None


class Engine:
    def __init__(self, directory: Path, *, name: str, safetensors_only: bool = True, plan: DevicePlan | None = None):
        self.name = name
        self.plan = plan or pick_device(torch.cuda.is_available(), torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        start = time.monotonic()
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, use_safetensors=safetensors_only or None, dtype=self.plan.dtype)
        self.model.to(self.plan.device).eval()
        self.load_seconds = time.monotonic() - start
        self.context = int(getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", 2048))
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        memory = f", {torch.cuda.memory_allocated() / 1e9:.2f} GB GPU memory" if self.plan.device == "cuda" else ""
        log.info("loaded %s from %s on %s (%s) in %.2fs%s", name, directory, self.plan.device, str(self.plan.dtype).removeprefix("torch."), self.load_seconds, memory)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The tokenizer's chat template; without one, 'role: content' lines and 'assistant:'."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def warm_up(self) -> None:
        """One tiny generation, so the first request does not pay for lazy initialisation."""
        self.complete("Hello", max_tokens=2)

    def complete(self, prompt: str, *, max_tokens: int, temperature: float = 0.0) -> Completion:
        """One prompt, unbatched: for warm-up and the serverless handler."""
        pieces: list[str] = []
        row = Row(self.encode(prompt) or [self.pad], max_tokens, temperature, 1.0, (), lambda text, _finish: pieces.append(text))
        self.generate([row])
        return Completion("".join(pieces), row.finish or "length", len(row.prompt_ids), len(row.generated))

    @torch.inference_mode()
    def generate(self, rows: list[Row]) -> None:
        """Decode every row together: one forward pass per step for the whole batch."""
        device = self.plan.device
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        temps = torch.tensor([r.temperature for r in rows], device=device, dtype=torch.float32)
        top_ps = torch.tensor([r.top_p for r in rows], device=device, dtype=torch.float32)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        steps = min(max(r.max_tokens for r in rows), self.context - width)
        for _ in range(max(steps, 0)):
            tokens = sample(out.logits[:, -1, :].float(), temps, top_ps)
            for row, token in zip(rows, tokens.tolist(), strict=True):
                if row.finish is None:
                    self._advance(row, token)
            if all(r.finish is not None for r in rows):
                return
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=out.past_key_values, use_cache=True)
        for row in rows:
            if row.finish is None:
                row.finish = "length"
                row.emit("", "length")

    def _advance(self, row: Row, token: int) -> None:
        if row.cancelled.is_set():
            row.finish = "cancelled"
            return
        if token == self.eos:
            row.finish = "stop"
            row.emit("", "stop")
            return
        row.generated.append(token)
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half a multi-byte character: wait for the rest
        delta, row.text = text[len(row.text):], text
        cut = first_stop(row.text, row.stop)
        if cut is not None:
            keep = max(0, cut - (len(row.text) - len(delta)))
            row.finish = "stop"
            row.emit(delta[:keep], "stop")
        elif len(row.generated) >= row.max_tokens:
            row.finish = "length"
            row.emit(delta, "length")
        else:
            row.emit(delta, None)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def sample(logits: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Per-row sampling: greedy where temperature is 0, else temperature + nucleus (top_p)."""
    greedy = logits.argmax(dim=-1)
    hot = temps > 0
    if not bool(hot.any()):
        return greedy
    scaled = logits / temps.clamp(min=1e-5)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_ps[:, None]
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = order.gather(-1, torch.multinomial(sorted_p, 1)).squeeze(-1)
    return torch.where(hot, choice, greedy)
