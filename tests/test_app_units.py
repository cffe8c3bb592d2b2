"""The app's pure functions, with plain data."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from app import packed as packed_module
from app import precision
from app.device import DevicePlan, pick_device
from app.engine import Engine
from app.kvcache import DecodeChoice, DecodeKernel, Segment, Shape, SlotCache, decode_attention, decode_mask, fastest_decode_attention
from app.loader import check_weights_format
from app.packed import PackedLinear, pack_linears, packing_works
from app.params import SamplingParams
from app.policy import Choice, first_stop, stop_prefix
from app.precision import compare, cpu_has_native_bf16
from app.sampling import sample
from app.tuning import tune
from ops.errors import NotServableError
from ops.models.lock import LockedFile, LockedModel

ROOT = Path(__file__).resolve().parent.parent


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


def row(params: SamplingParams, prompt: list[int], **fields: object) -> Choice:
    return Choice(prompt, params, budget=params.max_tokens, **fields)  # type: ignore[arg-type]


def test_sample_is_greedy_at_temperature_zero_per_row() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    rows = [row(SamplingParams(max_tokens=1, temperature=0), [0]), row(SamplingParams(max_tokens=1, temperature=0), [0])]
    assert sample(logits, rows, eos=None)[0] == [1, 0]
    torch.manual_seed(0)
    mixed = [row(SamplingParams(max_tokens=1, temperature=t, top_p=p), [0]) for t, p in [(0.0, 1.0), (1.0, 0.01)] * 50]
    hot, _ = sample(logits.repeat(50, 1), mixed, eos=None)
    assert hot[0::2] == [1] * 50  # greedy rows stay greedy
    assert hot[1::2] == [0] * 50  # top_p 0.01 keeps only the most likely token


def test_seeds_repeat_and_penalties_and_limits_steer() -> None:
    logits = torch.zeros(1, 50)
    draws = [sample(logits, [row(SamplingParams(max_tokens=1, seed=7), [0], generator=torch.Generator().manual_seed(7))], None)[0] for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    flat = torch.tensor([[1.0, 1.0, 0.0]])
    said = row(SamplingParams(max_tokens=4, temperature=0, presence_penalty=2.0), [2], generated=[0])
    said.counts[0] = 1
    assert sample(flat, [said], None)[0] == [1]  # token 0 was said already
    assert sample(torch.tensor([[0.0, 9.0, 0.0]]), [row(SamplingParams(max_tokens=4, temperature=0, min_tokens=2), [0])], eos=1)[0] == [0]
    assert sample(torch.tensor([[0.0, 9.0, 1.0]]), [row(SamplingParams(max_tokens=4, temperature=1.0, top_k=1), [0])], None)[0] == [1]


def test_a_row_whose_sampling_fails_fails_alone() -> None:
    """A row with no valid distribution (its logits went NaN) gets None and its reason; its neighbours are sampled as usual."""
    logits = torch.tensor([[0.0, 5.0, 1.0], [float("nan"), float("nan"), float("nan")], [3.0, 0.0, 0.0]])
    rows = [row(SamplingParams(max_tokens=1, temperature=1.0, top_k=1), [0]), row(SamplingParams(max_tokens=1, temperature=1.0), [0]),
            row(SamplingParams(max_tokens=1, temperature=0), [0])]
    tokens, failed = sample(logits, rows, eos=None)
    assert tokens == [1, None, 0] and list(failed) == [1]
    assert SamplingParams(max_tokens=1, temperature=1e-40).greedy  # below 1e-5: greedy, never logits / 1e-40


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
    monkeypatch.setenv("BAKEHOUSE_DTYPE", "auto")
    assert Settings.from_env().compile_kernels
    monkeypatch.setenv("BAKEHOUSE_COMPILE", "0")
    assert not Settings.from_env().compile_kernels
    for bad in ("-rf", "2", "yes please"):
        monkeypatch.setenv("BAKEHOUSE_COMPILE", bad)
        with pytest.raises(ConfigError, match="BAKEHOUSE_COMPILE"):
            Settings.from_env()


@pytest.mark.parametrize("kernel", ["sdpa", "matmul", "compiled"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(12, 12), (16, 8), (8, 2)])
def test_decode_attention_equals_sdpa_over_each_rows_own_length(kernel: DecodeKernel, heads: int, kv_heads: int) -> None:
    """Every decode kernel gives what SDPA gives with K/V repeated per query head, each row over its own length."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 9, 5])
    width = int(lengths.max()) + 1
    q = torch.randn(3, heads, 1, 16, generator=g)
    k, v = torch.randn(3, kv_heads, 32, 16, generator=g)[:, :, :width], torch.randn(3, kv_heads, 32, 16, generator=g)[:, :, :width]  # strided, as the cache's
    mask = decode_mask(lengths, torch.float32)
    out = decode_attention(kernel, q, k, v, mask, 0.25)
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(("dtype", "amx", "caches"), [(torch.float32, False, {None}), (torch.bfloat16, False, {torch.float32}),
                                                       (torch.bfloat16, True, {None, torch.float32})])
def test_the_decode_kernel_is_timed_with_the_caches_this_cpu_may_use(dtype: torch.dtype, amx: bool, caches: set[torch.dtype | None]) -> None:
    """Without AMX a bf16 cache is never chosen (nor timed); with AMX either may win; an fp32 model keeps its own dtype."""
    choice = fastest_decode_attention(Shape(4, 2, 16, dtype), torch.device("cpu"), rows=2, width=32, amx=amx)
    assert choice.kv_dtype in caches and choice.kernel in ("sdpa", "matmul")


@pytest.fixture(scope="module", params=["llama-gqa", "gpt2"])
def small_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, torch.nn.Module]:
    """A random-weight model with the demo tokenizer, saved and loaded as the app loads one; and the model itself, with transformers' SDPA."""
    torch.manual_seed(0)
    common = {"vocab_size": 401, "bos_token_id": 400, "eos_token_id": 400}
    if request.param == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_positions=512, n_embd=64, n_layer=2, n_head=4, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, **common))
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "demo" / "demo-tiny" / name, out / name)
    return Engine(out, name=request.param, plan=DevicePlan("cpu", torch.float32)), model.eval()


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_a_packed_step_gives_each_sequence_what_it_gets_alone(small_engine: tuple[Engine, torch.nn.Module], kernel: DecodeKernel) -> None:
    """Decode rows at different lengths and prompt chunks (one from column 0, one continuing a prompt) in one pass: each position's
    logits equal those of the sequence run alone through the model, without any cache."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (7, 12, 30, 25)]
    engine, reference = small_engine
    cache = SlotCache(engine.num_layers, 6, DecodeChoice(kernel))
    with torch.inference_mode():
        alone = [reference(input_ids=torch.tensor([s])).logits[0] for s in seqs]
        # rows 0 and 1 have their prompts minus the last token in the cache; sequence 3 has its first 10 tokens
        for slot, (seq, upto) in enumerate([(seqs[0], 6), (seqs[1], 11), (seqs[3], 10)]):
            cache.plan(None, [Segment(slot if slot < 2 else 5, 0, upto)], torch.float32, engine.device)
            engine.forward(seq[:upto], cache, torch.tensor([upto - 1]))
        cache.plan(torch.tensor([6, 11]), [Segment(4, 0, 30), Segment(5, 10, 15)], torch.float32, engine.device)
        ids = [seqs[0][6], seqs[1][11], *seqs[2], *seqs[3][10:]]
        logits = engine.forward(ids, cache, torch.tensor([0, 1, *range(2, 32), *range(32, 47)]))
    torch.testing.assert_close(logits[0], alone[0][6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], alone[1][11], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[2:32], alone[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[32:47], alone[3][10:], atol=1e-4, rtol=1e-4)


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    (tmp_path / "amx").write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    (tmp_path / "avx").write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    (tmp_path / "none").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert [cpu_has_native_bf16(tmp_path / n) for n in ("amx", "avx", "none", "missing")] == [True, True, False, False]
    assert pick_device(False, False, cpu_bf16=True).try_bf16 and not pick_device(True, True, cpu_bf16=True).try_bf16


def test_precision_check_compares_top1_and_kl() -> None:
    sharp = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    runs = iter([sharp, sharp + 0.001])
    same = compare(lambda: next(runs), lambda: None)
    assert (same.tokens, same.top1_agreement) == (2, 1.0) and same.mean_kl < 1e-6 and same.passed
    runs = iter([sharp, sharp.roll(1, dims=-1)])
    flipped = compare(lambda: next(runs), lambda: None)
    assert flipped.top1_agreement == 0.0 and flipped.mean_kl > 1 and not flipped.passed
    assert "fp32 kept" in flipped.describe() and "bf16 kept" in same.describe()
    runs = iter([sharp, sharp])
    times = iter([0.010] * 6 + [0.020] * 6)  # fp32's warm-up and 5 runs, then bf16's: bf16 twice as slow
    slower = compare(lambda: next(runs), lambda: None, lambda: time.sleep(next(times)))
    assert slower.accurate and not slower.faster and not slower.passed
    assert "fp32 kept: bf16 is not faster here" in slower.describe() and "in fp32 and" in slower.describe()


@pytest.mark.parametrize("passes", [True, False])
def test_auto_dtype_keeps_bf16_only_when_the_check_passes(small_engine: tuple[Engine, torch.nn.Module], passes: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The passage is run in fp32 then bf16; a model that fails is reloaded in fp32 (a cast back would not restore its bits)."""
    monkeypatch.setattr(precision, "MIN_TOP1_AGREEMENT", 0.0 if passes else 1.01)
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)  # whichever is faster on this CPU: the quality verdict is what is tested here
    directory = Path(small_engine[0].model.name_or_path)
    engine = Engine(directory, name="m", plan=DevicePlan("cpu", torch.float32, try_bf16=True))
    assert engine.precision is not None and engine.precision.tokens > 50 and engine.precision.passed is passes
    assert engine.precision.fp32_step_seconds and engine.precision.bf16_step_seconds  # both dtypes timed at load
    expected = torch.bfloat16 if passes else torch.float32
    assert engine.dtype == expected and {p.dtype for p in engine.model.parameters()} == {expected}


def packed_op_agrees(linear: torch.nn.Module) -> bool:
    """Does oneDNN's packed op run here and give F.linear's result? Asked of the op itself, not of packing_works."""
    x = torch.randn(1, 8, linear.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    try:
        with torch.inference_mode():
            got = PackedLinear(linear)(x).float()
    except RuntimeError:
        return False
    with torch.inference_mode():
        return torch.allclose(got, linear(x).float(), atol=0.05, rtol=0.02)


def test_fp32_layers_are_packed_only_where_it_pays_and_give_the_plain_ones_result(small_engine: tuple[Engine, torch.nn.Module],
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, reference = small_engine
    layer = torch.nn.Linear(256, 384)
    assert isinstance(packed_module.packing_pays(layer, torch.float32), bool)  # this CPU's verdict, timed
    monkeypatch.setattr(packed_module, "packing_pays", lambda linear, dtype: False)
    assert pack_linears(copy.deepcopy(reference), torch.float32, torch.device("cpu")) == 0
    monkeypatch.setattr(packed_module, "packing_pays", lambda linear, dtype: True)
    packed = copy.deepcopy(reference)
    linears = [m for m in packed.modules() if type(m) is torch.nn.Linear and m is not packed.get_output_embeddings()]  # GPT-2 has none
    assert pack_linears(packed, torch.float32, torch.device("cpu")) == len(linears)
    ids = torch.randint(0, 400, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(packed(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_packed_linear_layers_give_the_plain_ones_result(small_engine: tuple[Engine, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 on CPU: every linear layer but the output one packed for oneDNN, the logits those of the plain model (to bf16's precision)."""
    _, reference = small_engine
    monkeypatch.setattr(packed_module, "packing_pays", lambda linear, dtype: True)  # whether it pays is this CPU's: correctness is tested
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    count = pack_linears(packed, torch.bfloat16, torch.device("cpu"))
    linears = [m for m in plain.modules() if type(m) is torch.nn.Linear and m is not plain.get_output_embeddings()]
    assert packing_works(torch.bfloat16) is packed_op_agrees(torch.nn.Linear(256, 384).to(torch.bfloat16))  # the engine's verdict is this CPU's truth
    if not packing_works(torch.bfloat16):  # this CPU's oneDNN has no packed bf16 kernel (no AVX-512 BF16, say): every plain layer stays
        assert count == 0 and len([m for m in packed.modules() if type(m) is torch.nn.Linear]) == len([m for m in plain.modules() if type(m) is torch.nn.Linear])
        return
    assert count == len(linears) and not any(type(m) is torch.nn.Linear and m is not packed.get_output_embeddings() for m in packed.modules())
    ids = torch.randint(0, 400, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(packed(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_decode_rows_in_different_tiers_each_get_what_they_get_alone(small_engine: tuple[Engine, torch.nn.Module], kernel: DecodeKernel) -> None:
    """Rows of 20, 300 and 100 tokens: rows 0 and 2 share the 256-column tier, row 1 has a 512-column row; each row's logits are its own."""
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (21, 301, 101)]
    engine, reference = small_engine
    cache = SlotCache(engine.num_layers, 4, DecodeChoice(kernel))
    with torch.inference_mode():
        alone = [reference(input_ids=torch.tensor([s])).logits[0, -1] for s in seqs]
        for slot, seq in enumerate(seqs):
            cache.plan(None, [Segment(slot, 0, len(seq) - 1)], torch.float32, engine.device)
            engine.forward(seq[:-1], cache, torch.tensor([len(seq) - 2]))
        step = cache.plan(torch.tensor([20, 300, 100]), [], torch.float32, engine.device)
        assert [(grp.tier.columns, grp.rows.tolist()) for grp in step.groups] == [(256, [0, 2]), (512, [1])] and not step.in_order
        logits = engine.forward([s[-1] for s in seqs], cache, torch.tensor([0, 1, 2]))
    for got, want in zip(logits, alone, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_a_bf16_model_with_an_fp32_cache_gives_its_own_logits(small_engine: tuple[Engine, torch.nn.Module], kernel: DecodeKernel) -> None:
    """The cache kept in fp32 for a bf16 model (attention in fp32): a prompt chunk and a decode row, each as the bf16 model alone."""
    engine, reference = small_engine
    directory = Path(engine.model.name_or_path)
    bf16 = Engine(directory, name="m", plan=DevicePlan("cpu", torch.bfloat16))
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    seq = torch.randint(0, 400, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    cache = SlotCache(bf16.num_layers, 2, DecodeChoice(kernel, torch.float32))
    with torch.inference_mode():
        want = plain(input_ids=torch.tensor([seq])).logits[0].float()
        cache.plan(None, [Segment(0, 0, 39)], torch.bfloat16, bf16.device)
        first = bf16.forward(seq[:39], cache, torch.arange(39)).float()
        cache.plan(torch.tensor([39]), [], torch.bfloat16, bf16.device)
        last = bf16.forward(seq[39:], cache, torch.tensor([0])).float()
    assert all(t.dtype == torch.float32 for layer in cache.slot_layers for t in layer.tier_keys.values())
    torch.testing.assert_close(first, want[:39], atol=0.05, rtol=0.05)
    torch.testing.assert_close(last[0], want[39], atol=0.05, rtol=0.05)


def test_switching_to_the_compiled_kernel_between_steps_keeps_each_rows_logits(small_engine: tuple[Engine, torch.nn.Module]) -> None:
    """A bf16 model serving from an fp32 cache switches (as app.tuning makes it) to the compiled kernel over a bf16 cache between two
    steps: the keys and values held are converted, and the next decode steps give the bf16 model's own logits."""
    engine, reference = small_engine
    bf16 = Engine(Path(engine.model.name_or_path), name="m", plan=DevicePlan("cpu", torch.bfloat16))
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    seqs = [torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(6)).tolist() for n in (30, 42)]
    cache = SlotCache(bf16.num_layers, 2, DecodeChoice("matmul", torch.float32))
    with torch.inference_mode():
        want = [plain(input_ids=torch.tensor([s])).logits[0].float() for s in seqs]
        cache.plan(None, [Segment(0, 0, 28), Segment(1, 0, 40)], torch.bfloat16, bf16.device)
        bf16.forward(seqs[0][:28] + seqs[1][:40], cache, torch.tensor([27, 67]))
        cache.plan(torch.tensor([28, 40]), [], torch.bfloat16, bf16.device)
        before = bf16.forward([seqs[0][28], seqs[1][40]], cache, torch.tensor([0, 1])).float()
        held = [t.clone() for layer in cache.slot_layers for t in layer.tier_keys.values()]
        cache.switch(DecodeChoice("compiled"), torch.bfloat16)
        assert all(t.dtype == torch.bfloat16 for layer in cache.slot_layers for t in layer.tier_keys.values())
        converted = [t for layer in cache.slot_layers for t in layer.tier_keys.values()]
        assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(held, converted, strict=True))  # exact: computed in bf16
        step = cache.plan(torch.tensor([29, 41]), [], torch.bfloat16, bf16.device)
        assert step.kernel == "compiled" and step.kv_dtype is None
        after = bf16.forward([seqs[0][29], seqs[1][41]], cache, torch.tensor([0, 1])).float()
    for got, row, pos in ((before, 0, 28), (before, 1, 40), (after, 0, 29), (after, 1, 41)):
        torch.testing.assert_close(got[row], want[row][pos], atol=0.05, rtol=0.05)


def test_tuning_times_the_compiled_kernel_against_the_one_in_use_and_says_why() -> None:
    """The compiled kernel is compiled, checked and timed at both shapes; adopted or kept, the verdict names what was timed."""
    current = DecodeChoice("matmul", torch.float32)
    try:
        adopt, tuning = tune(Shape(4, 2, 16, torch.bfloat16), current)
    finally:
        torch.compiler.set_stance("default")  # an adopted kernel stops recompiles for the process; the other tests compile their own shapes
    assert tuning.state in ("adopted", "kept") and (adopt is not None) == (tuning.state == "adopted"), tuning
    assert "8 rows x 256 columns" in tuning.detail and "32 rows x 512 columns" in tuning.detail and "matmul, float32 cache" in tuning.detail
    if adopt is not None:
        assert adopt == DecodeChoice("compiled") and "bfloat16 cache" in tuning.detail


def test_a_4k_token_request_at_a_7b_shape_does_not_grow_every_slot() -> None:
    """Mistral-7B's KV shape (8 KV heads of 128, bf16), 40 slots: 39 rows of 100 tokens and one of 4000 take about 40 x 256 + 4096 columns
    (not 40 x 4096, 21.5 GB over 32 layers); when the long row ends its memory is given back."""
    layers, heads, dim = 2, 8, 128
    cache = SlotCache(layers, 40)
    column = 2 * heads * dim * 2  # keys and values of one token in one layer, bf16

    def step(lengths: list[int]) -> None:
        cache.plan(torch.tensor(lengths), [], torch.bfloat16, torch.device("cpu"))
        new = torch.zeros(1, heads, len(lengths), dim, dtype=torch.bfloat16)
        for layer in cache.slot_layers:
            layer.update(new, new)

    step([100] * 39 + [4000])
    assert cache.nbytes <= layers * column * (40 * 256 + 4096) * 1.3
    assert cache.nbytes < layers * column * 40 * 4096 / 10
    step([101] * 39)  # the long row ended
    assert cache.nbytes <= layers * column * 39 * 256 * 1.3


def test_a_step_of_only_an_unfinished_prompt_chunk_runs(small_engine: tuple[Engine, torch.nn.Module]) -> None:
    """A long prompt alone, chunked: its first steps need no logits at all (an empty index), and the answer equals the model's greedy one."""
    from app.metrics import Metrics
    from app.scheduler import Scheduler, complete

    engine, reference = small_engine
    prompt = torch.randint(0, 400, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    scheduler = Scheduler(engine, Metrics(), max_batch=4, step_tokens=32).start()
    try:
        result = complete(scheduler, prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    finally:
        scheduler.stop()
    with torch.inference_mode():
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert result.finish_reason == "length" and result.completion_tokens == 5
    assert engine.encode(result.text) == want or result.text == engine.decode(want)


def test_the_scheduler_adopts_a_kernel_between_steps_mid_generation(small_engine: tuple[Engine, torch.nn.Module]) -> None:
    """Scheduler.adopt while sequences are generating (what app.tuning does after ready): the cache switches between two steps and
    every sequence's greedy tokens are those of a run that never switched."""
    import threading

    from app.metrics import Metrics
    from app.scheduler import Scheduler, choice

    engine, _ = small_engine
    bf16 = Engine(Path(engine.model.name_or_path), name="m", plan=DevicePlan("cpu", torch.bfloat16))
    bf16.attention = DecodeChoice("matmul", torch.float32)
    prompts = [torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 20, 33)]

    def generate(switch_after: int | None) -> list[list[int]]:
        scheduler = Scheduler(bf16, Metrics(), max_batch=4, step_tokens=64).start()
        tokens: list[list[int]] = [[] for _ in prompts]
        done, first = threading.Semaphore(0), threading.Event()

        def emit(i: int, out: object) -> None:
            tokens[i].extend(out.token_ids)  # type: ignore[attr-defined]
            if switch_after is not None and len(tokens[i]) >= switch_after:
                first.set()
            if out.finish is not None:  # type: ignore[attr-defined]
                done.release()

        try:
            scheduler.submit([choice(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), bf16.context,
                                     lambda out, i=i: emit(i, out)) for i, p in enumerate(prompts)])
            if switch_after is not None:
                first.wait(60)
                scheduler.adopt(DecodeChoice("compiled"))
            for _ in prompts:
                assert done.acquire(timeout=120)
            if switch_after is not None:
                assert scheduler.cache.decode == DecodeChoice("compiled") and bf16.attention == DecodeChoice("compiled")
                assert all(t.dtype == torch.bfloat16 for layer in scheduler.cache.slot_layers for t in layer.tier_keys.values())
        finally:
            scheduler.stop()
        return tokens

    plain = generate(None)
    switched = generate(10)
    assert switched == plain and all(len(t) == 40 for t in plain)


def test_the_compile_cache_is_a_directory_of_this_users_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled kernels are loaded from this cache: never torch's /tmp default, never a planted link, a directory open to others or
    someone else's; TORCHINDUCTOR_CACHE_DIR set by the operator wins."""
    from app.kvcache import inductor_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the directories made for a process, here rather than in /tmp
    uid = os.getuid()
    home = tmp_path / "home"
    own = inductor_cache_dir(home, uid)
    assert own == home / ".cache" / "bakehouse" / "torchinductor" and own.is_dir() and not own.stat().st_mode & 0o077
    planted, target = tmp_path / "planted", tmp_path / "attacker"
    target.mkdir(mode=0o700)
    (planted / ".cache" / "bakehouse").mkdir(parents=True)
    (planted / ".cache" / "bakehouse" / "torchinductor").symlink_to(target)
    open_home = tmp_path / "open"
    (open_home / ".cache" / "bakehouse" / "torchinductor").mkdir(parents=True)
    (open_home / ".cache" / "bakehouse" / "torchinductor").chmod(0o777)
    for unsafe in (planted, open_home, tmp_path / "not-a-dir" / "x", None):
        if unsafe == tmp_path / "not-a-dir" / "x":
            (tmp_path / "not-a-dir").write_text("a file where a directory would be")
        got = inductor_cache_dir(unsafe, uid)
        assert got.name.startswith("bakehouse-torchinductor-") and got.is_dir() and not got.is_symlink() and not got.stat().st_mode & 0o077, got
        assert got.resolve() != target.resolve()
    someone_else = inductor_cache_dir(home, uid + 1)  # the directory exists but is not this uid's
    assert someone_else != own and someone_else.name.startswith("bakehouse-torchinductor-")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))
    assert inductor_cache_dir(home, uid) == tmp_path / "chosen"
