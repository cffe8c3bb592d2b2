"""Load a verified model: the only way the app gets one, and what a generation step runs on.

The model is loaded only from `$MODELS_DIR/<name>/<commit>` after a quick
verify against models.lock, with `local_files_only=True`: the engine never
talks to a hub.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from app.kvcache import SLOT_ATTENTION, Segment, SlotCache, fastest_decode_attention
from app.packed import pack_linears
from app.precision import PASSAGE, PrecisionCheck, compare
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
    try_bf16: bool = False  # load as `dtype` (fp32), then keep bf16 if the model passes app.precision's check


def pick_device(cuda_available: bool, bf16_supported: bool, cpu_bf16: bool = False) -> DevicePlan:
    """CUDA in bf16 where supported, else fp16; CPU in fp32, or bf16 after a quality check where the CPU computes bf16 natively."""
    if cuda_available:
        return DevicePlan("cuda", torch.bfloat16 if bf16_supported else torch.float16)
    return DevicePlan("cpu", torch.float32, try_bf16=cpu_bf16)


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
class Verified:
    model: LockedModel
    directory: Path
    safetensors_only: bool
    verify_seconds: float


@contextlib.contextmanager
def verified(settings: Settings, on_state: Callable[[str, str], None] = lambda state, reason: None) -> Iterator[Verified]:
    """The one way any engine gets a model: wait for a fetch in progress, quick verify, check the format; the store stays as verified inside."""
    store = Store(settings.models_dir)
    on_state("waiting", f"waiting for a fetch of {settings.model} in progress")
    with store.reading(settings.model):
        on_state("verifying", f"verifying {settings.model}")
        t0 = time.monotonic()
        model, directory = verified_path(store, settings.lock, settings.model)
        verify_seconds = time.monotonic() - t0
        yield Verified(model, directory, check_weights_format(model, settings.allow_pickle), verify_seconds)


@dataclass(frozen=True)
class Loaded:
    engine: Engine
    verify_seconds: float


def load_verified(settings: Settings, on_state: Callable[[str, str], None] = lambda state, reason: None) -> Loaded:
    """The transformers engine on the verified commit directory."""
    with verified(settings, on_state) as v:
        on_state("loading", f"loading {settings.model} from {v.directory}")
        engine = Engine(v.directory, name=settings.model, safetensors_only=v.safetensors_only, plan=settings.device_plan())
    return Loaded(engine, v.verify_seconds)


class Engine:
    """The model and its tokenizer on their device, and one forward pass over the slotted cache (app.kvcache)."""

    def __init__(self, directory: Path, *, name: str, safetensors_only: bool = True, plan: DevicePlan | None = None):
        self.name = name
        self.plan = plan or pick_device(torch.cuda.is_available(), torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        start = time.monotonic()
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(directory, local_files_only=True)

        def load(dtype: torch.dtype) -> PreTrainedModel:
            return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, use_safetensors=safetensors_only or None, dtype=dtype,
                                                        attn_implementation=SLOT_ATTENTION).to(self.plan.device).eval()

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
        self.packed_layers = pack_linears(self.model, self.dtype, self.device)
        self.load_seconds = time.monotonic() - start
        heads = int(config.num_attention_heads)
        self.decode_kernel = fastest_decode_attention(self.dtype, self.device, heads, int(getattr(config, "num_key_value_heads", None) or heads),
                                                      int(getattr(config, "head_dim", None) or config.hidden_size // heads))
        memory = f", {torch.cuda.memory_allocated() / 1e9:.2f} GB GPU memory" if self.plan.device == "cuda" else ""
        log.info("loaded %s from %s on %s (%s, decode attention: %s, packed linear layers: %d) in %.2fs%s", name, directory, self.plan.device,
                 str(self.dtype).removeprefix("torch."), self.decode_kernel, self.packed_layers, self.load_seconds, memory)

    def _check_bf16(self) -> PrecisionCheck:
        """The passage through the model in fp32, then in bf16 (the model is bf16 afterwards)."""
        ids = self.encode(PASSAGE)[: self.context]

        def logits() -> torch.Tensor:
            cache = SlotCache(self.num_layers, 1)
            cache.plan(None, [Segment(0, 0, len(ids))], self.dtype, self.device)
            with torch.inference_mode():
                return self.forward(ids, cache, torch.arange(len(ids)))

        def to_bf16() -> None:
            self.model.to(torch.bfloat16)
            self.dtype = torch.bfloat16

        return compare(logits, to_bf16)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The tokenizer's chat template; without one, 'role: content' lines and 'assistant:'."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def forward(self, ids: Sequence[int], cache: SlotCache, keep: torch.Tensor) -> torch.Tensor:
        """Logits [len(keep), vocab] at the kept positions of one packed step (`cache.current`: decode rows, then prompt chunks)."""
        out = self.model(input_ids=torch.tensor(list(ids), device=self.device)[None], position_ids=cache.positions(self.device), use_cache=True,
                         logits_to_keep=keep, slot_step=cache.current, **{self.cache_argument: cache})
        return out.logits[0]
