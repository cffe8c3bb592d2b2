"""The app's pure functions, with plain data."""

from __future__ import annotations

import pytest
import torch

from app.engine import NotServableError, check_weights_format, first_stop, pick_device, sample
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
    assert sample(logits, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])).tolist() == [1, 0]
    torch.manual_seed(0)
    hot = sample(logits.repeat(50, 1), torch.tensor([0.0, 1.0] * 50), torch.tensor([1.0, 0.01] * 50))
    assert hot[0::2].tolist() == [1] * 50  # greedy rows stay greedy
    assert hot[1::2].tolist() == [0] * 50  # top_p 0.01 keeps only the most likely token


def test_first_stop() -> None:
    assert first_stop("locked, fetched", [",", "fetched"]) == 6
    assert first_stop("locked", [","]) is None
    assert first_stop("x", [""]) is None


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
    monkeypatch.setenv("BAKEHOUSE_MAX_WAIT_MS", "2.5")
    s = Settings.from_env()
    assert (s.max_batch, s.max_wait_ms) == (8, 2.5)
