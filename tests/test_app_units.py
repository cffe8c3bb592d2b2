"""The app's pure functions, with plain data."""

from __future__ import annotations

import pytest
import torch

from app.engine import NotServableError, check_weights_format, pick_device
from app.kvcache import decode_mask, slot_attention
from app.sampling import RowState, SamplingParams, sample
from app.scheduler import first_stop, stop_prefix
from ops.models.lock import LockedFile, LockedModel


def locked(*paths: str, allow_pickle: bool = False) -> LockedModel:
    return LockedModel("m", "hf://o/r", "main", "c" * 40, "s", tuple(LockedFile(p, 1, "a" * 64) for p in paths), allow_pickle=allow_pickle)


def test_device_plan() -> None:
    assert pick_device(True, True).dtype == torch.bfloat16
    assert pick_device(True, False).dtype == torch.float16
    assert (pick_device(False, False).device, pick_device(False, False).dtype) == ("cpu", torch.float32)


def test_safetensors_preferred_and_pickle_refused_unless_allowed() -> None:
    assert check_weights_format(locked("model.safetensors", "pytorch_model.bin"), allow_pickle=False) is True
    with pytest.raises(NotServableError, match="allow_pickle"):
        check_weights_format(locked("config.json", "neuroq_pretrained.pt"), allow_pickle=False)
    assert check_weights_format(locked("neuroq_pretrained.pt", allow_pickle=True), allow_pickle=False) is False
    assert check_weights_format(locked("pytorch_model.bin"), allow_pickle=True) is False


def test_sample_is_greedy_at_temperature_zero_per_row() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    rows = [RowState(SamplingParams(max_tokens=1, temperature=0), [0]), RowState(SamplingParams(max_tokens=1, temperature=0), [0])]
    assert sample(logits, rows, eos=None) == [1, 0]
    torch.manual_seed(0)
    mixed = [RowState(SamplingParams(max_tokens=1, temperature=t, top_p=p), [0]) for t, p in [(0.0, 1.0), (1.0, 0.01)] * 50]
    hot = sample(logits.repeat(50, 1), mixed, eos=None)
    assert hot[0::2] == [1] * 50  # greedy rows stay greedy
    assert hot[1::2] == [0] * 50  # top_p 0.01 keeps only the most likely token


def test_seeds_repeat_and_penalties_and_limits_steer() -> None:
    logits = torch.zeros(1, 50)
    draws = [sample(logits, [RowState(SamplingParams(max_tokens=1, seed=7), [0], generator=torch.Generator().manual_seed(7))], None) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    flat = torch.tensor([[1.0, 1.0, 0.0]])
    row = RowState(SamplingParams(max_tokens=4, temperature=0, presence_penalty=2.0), [2], generated=[0])
    row.counts[0] = 1
    assert sample(flat, [row], None) == [1]  # token 0 was said already
    assert sample(torch.tensor([[0.0, 9.0, 0.0]]), [RowState(SamplingParams(max_tokens=4, temperature=0, min_tokens=2), [0])], eos=1) == [0]
    assert sample(torch.tensor([[0.0, 9.0, 1.0]]), [RowState(SamplingParams(max_tokens=4, temperature=1.0, top_k=1), [0])], None) == [1]


def test_first_stop() -> None:
    assert first_stop("locked, fetched", [",", "fetched"]) == 6
    assert first_stop("locked", [","]) is None
    assert first_stop("x", [""]) is None
    assert stop_prefix("the end\n", ["\n\n"], 0) == 1  # a newline may start "\n\n": held back
    assert stop_prefix("the end", ["\n\n"], 0) == 0


def test_bad_numeric_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import Settings
    from ops.errors import ConfigError

    monkeypatch.setenv("BAKEHOUSE_MAX_BATCH", "many")
    with pytest.raises(ConfigError, match="BAKEHOUSE_MAX_BATCH='many' is not a whole number"):
        Settings.from_env()
    monkeypatch.setenv("BAKEHOUSE_MAX_BATCH", "0")
    with pytest.raises(ConfigError, match="must be above zero"):
        Settings.from_env()
    monkeypatch.setenv("BAKEHOUSE_MAX_BATCH", "8")
    monkeypatch.setenv("BAKEHOUSE_STEP_TOKENS", "256")
    monkeypatch.setenv("BAKEHOUSE_DTYPE", "bfloat16")
    s = Settings.from_env()
    assert (s.max_batch, s.step_tokens, s.device_plan().dtype) == (8, 256, torch.bfloat16)
    monkeypatch.setenv("BAKEHOUSE_DTYPE", "fp8")
    with pytest.raises(ConfigError, match="BAKEHOUSE_DTYPE"):
        Settings.from_env()


@pytest.mark.parametrize(("heads", "kv_heads"), [(12, 12), (16, 8), (8, 2)])
def test_decode_attention_equals_sdpa_over_each_rows_own_length(heads: int, kv_heads: int) -> None:
    """The decode path (two matmuls, query heads grouped per key head) gives what SDPA gives with K/V repeated per query head."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 9, 5])
    width = int(lengths.max()) + 1
    q = torch.randn(3, heads, 1, 16, generator=g)
    k, v = torch.randn(3, kv_heads, 32, 16, generator=g)[:, :, :width], torch.randn(3, kv_heads, 32, 16, generator=g)[:, :, :width]  # strided, as the cache's
    mask = decode_mask(lengths, torch.float32)
    out, _ = slot_attention(torch.nn.Module(), q, k, v, mask, scaling=0.25)
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), attn_mask=mask, scale=0.25)
    assert out.shape == (3, 1, heads, 16)
    torch.testing.assert_close(out, expected.transpose(1, 2))
