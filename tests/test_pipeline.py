"""The layer-by-layer pipeline on a toy Llama: folding is exact, quantization runs."""

from __future__ import annotations

import pytest
import torch

from quantcompose.errors import CalibrationError, UnsupportedArchitectureError
from quantcompose.hookspecs import hookimpl
from quantcompose.models import get_adapter
from quantcompose.models.adapter import InputPlace
from quantcompose.pipeline import count_quantized, quantize_model, sequential_groups, split_absorbable
from quantcompose.plugin_manager import StrategyManager
from quantcompose.qlinear import QuantLinear
from quantcompose.strategy import Plan, QuantSettings, Strategy
from quantcompose.transforms import BlockRotation, Compose, Permutation, Scale

from toymodel import TOY_ARCHS, tiny_llama, tiny_model


class RandomComposition(Strategy):
    """A strategy that returns a random scale · rotation · permutation · rotation."""

    name = "random-composition"
    description = "test strategy"

    def plan(self, stats, options, settings):
        g = torch.Generator().manual_seed(stats.layer_index * 10 + len(stats.place))
        n = stats.width
        transform = Compose([
            Scale(torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.25),
            BlockRotation.random(n, 32, generator=g),
            Permutation(torch.randperm(n, generator=g)),
            BlockRotation.random(n, 24, generator=g),
        ])
        return Plan(transform, settings.act_spec(), settings.weight_spec())


class _TestPlugin:
    @hookimpl
    def quantcompose_strategies(self):
        yield RandomComposition()


def _manager() -> StrategyManager:
    manager = StrategyManager()
    manager.register(_TestPlugin(), name="test-strategies")
    return manager


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("kv_heads", [4, 2])  # no GQA: o's scale folds into v; GQA: runs online
def test_folding_a_random_composition_is_exact(kv_heads):
    model = tiny_llama(kv_heads=kv_heads).double()
    tokens = torch.randint(0, 128, (2, 24))
    before = _logits(model, tokens)
    calib = torch.randint(0, 128, (3, 16))
    report = quantize_model(model, calib, "random-composition", QuantSettings(wbits=16, abits=16, storage_dtype="float32"),
                            manager=_manager(), progress=False)
    assert count_quantized(model) == 2 * 7
    after = _logits(model, tokens)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)
    folded = {(p["place"], p["folded"]) for p in report.places}
    assert ("attn_in", "Scale") in folded and ("mlp_down", "Scale") in folded
    assert ("attn_out", "Scale" if kv_heads == 4 else "-") in folded


def test_quantized_toy_model_runs_and_degrades_gracefully():
    model = tiny_llama()
    tokens = torch.randint(0, 128, (2, 24))
    before = _logits(model, tokens)
    calib = torch.randint(0, 128, (4, 16))
    quantize_model(model, calib, "rtn", QuantSettings(wbits=8, abits=8), progress=False)
    after = _logits(model, tokens)
    assert torch.isfinite(after).all()
    rel = (after - before).norm() / before.norm()
    assert 0 < rel < 0.05
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.weight_codes.dtype == torch.uint8


def _quantized_error(settings: QuantSettings) -> tuple[float, torch.nn.Module]:
    torch.manual_seed(0)
    model = tiny_llama()
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(model, tokens)
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    quantize_model(model, calib, "duquant", settings, {"block_size": 16, "steps": 8}, progress=False)
    after = _logits(model, tokens)
    return float((after - before).norm() / before.norm()), model


def test_gptq_weights_and_act_clip_search_run_through_the_pipeline():
    base, _ = _quantized_error(QuantSettings(wbits=4, abits=16, weight_clip_search=False, weight_quantizer="rtn"))
    gptq, model = _quantized_error(QuantSettings(wbits=4, abits=16, weight_clip_search=False, weight_quantizer="gptq"))
    assert 0 < gptq < base  # GPTQ compensates the rounding error RTN leaves
    q, k = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj
    assert q.weight_codes.shape[0] == q.out_features and k.weight_codes.shape[0] == k.out_features
    _, model = _quantized_error(QuantSettings(wbits=16, abits=4, act_clip_search=True))
    ratios = {m.act_spec.clip_ratio for m in model.modules() if isinstance(m, QuantLinear)}
    assert ratios and all(0.6 <= r <= 1.0 for r in ratios)


def test_worker_threads_do_not_change_the_result():
    # Places are fitted and quantized side by side; the codes must not depend on it.
    models = []
    for workers in (1, 2):
        torch.manual_seed(0)
        model = tiny_llama()
        calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
        quantize_model(model, calib, "duquant", QuantSettings(wbits=4, abits=8), {"block_size": 16, "steps": 8},
                       progress=False, workers=workers)
        models.append(model)
    one, two = ({n: m.weight_codes for n, m in model.named_modules() if isinstance(m, QuantLinear)} for model in models)
    assert one.keys() == two.keys() and len(one) == 2 * 7
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_sequential_groups_split_attention_from_mlp():
    model = tiny_llama()
    places = get_adapter(model).places(model.model.layers[0])
    groups = sequential_groups(places)
    assert [[p.name for p in g] for g in groups] == [["attn_in", "attn_out"], ["mlp_in", "mlp_down"]]
    # A place that folds into a linear of an earlier group keeps everything in one group.
    odd = [*places[:2], InputPlace("mlp_in", ("mlp.gate_proj",), "self_attn.o_proj", "linear", "diagonal")]
    assert [len(g) for g in sequential_groups(odd)] == [3]


def _codes_by_name(model):
    return {n: m.weight_codes for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_true_sequential_calibrates_the_mlp_on_quantized_attention():
    results = []
    for sequential in (False, True):
        torch.manual_seed(0)
        model = tiny_llama()
        calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
        settings = QuantSettings(wbits=4, abits=4, true_sequential=sequential)
        quantize_model(model, calib, "duquant", settings, {"block_size": 16, "steps": 8}, progress=False)
        results.append(_codes_by_name(model))
    plain, sequential = results
    # Layer 0's attention sees the same inputs either way; its MLP sees what the quantized attention produces.
    attention = [n for n in plain if n.startswith("model.layers.0.self_attn")]
    mlp = [n for n in plain if n.startswith("model.layers.0.mlp")]
    assert attention and all(torch.equal(plain[n], sequential[n]) for n in attention)
    assert mlp and not all(torch.equal(plain[n], sequential[n]) for n in mlp)


def test_true_sequential_folding_stays_exact():
    model = tiny_llama(kv_heads=2).double()
    tokens = torch.randint(0, 128, (2, 24))
    before = _logits(model, tokens)
    calib = torch.randint(0, 128, (3, 16))
    quantize_model(model, calib, "random-composition", QuantSettings(wbits=16, abits=16, storage_dtype="float32", true_sequential=True),
                   manager=_manager(), progress=False)
    torch.testing.assert_close(_logits(model, tokens), before, rtol=1e-9, atol=1e-9)


def test_defaults_are_gptq_with_activation_clip_search():
    settings = QuantSettings()
    assert settings.weight_quantizer == "gptq" and settings.act_clip_search


def test_int4_weights_are_packed():
    model = tiny_llama()
    quantize_model(model, torch.randint(0, 128, (2, 16)), "rtn", QuantSettings(wbits=4, abits=16), progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight_codes.shape == (layer.out_features, layer.in_features // 2)


def test_qkv_follow_the_activation_bits_by_default_and_16_leaves_them_float():
    from quantcompose.attention_quant import attention_quantizer_of

    calib = torch.randint(0, 128, (2, 16))
    model = tiny_llama()
    report = quantize_model(model, calib, "rtn", QuantSettings(wbits=8, abits=6), progress=False)
    for layer in model.model.layers:
        q = attention_quantizer_of(layer.self_attn)
        assert q is not None and q.q_spec.bits == q.k_spec.bits == q.v_spec.bits == 6
        assert q.qk_rotation is None  # rtn has no Q/K rotation
    assert report.attention.startswith("Q=")
    light = tiny_llama()
    report = quantize_model(light, calib, "rtn", QuantSettings(wbits=8, abits=6, qkv_bits=16), progress=False)
    assert report.attention is None
    assert all(attention_quantizer_of(layer.self_attn) is None for layer in light.model.layers)
    assert light.config._attn_implementation == tiny_llama().config._attn_implementation


def test_quarot_rotates_queries_and_keys_when_they_are_quantized():
    from quantcompose.attention_quant import attention_quantizer_of

    model = tiny_llama()
    quantize_model(model, torch.randint(0, 128, (2, 16)), "quarot", QuantSettings(wbits=4, abits=4), progress=False)
    q = attention_quantizer_of(model.model.layers[1].self_attn)
    assert q.qk_rotation is not None and q.qk_rotation.size == 24 and q.k_spec.bits == 4


def test_quantized_attention_calibrates_the_next_layer():
    """Layer 1's statistics come from layer 0 with quantized Q/K/V: the two settings give different codes."""
    calib = torch.randint(0, 128, (2, 16))
    codes = []
    for qkv_bits in (None, 16):
        model = tiny_llama()
        quantize_model(model, calib, "rtn", QuantSettings(wbits=4, abits=4, qkv_bits=qkv_bits), progress=False)
        codes.append(model.model.layers[1].self_attn.o_proj.weight_codes.clone())
    assert not torch.equal(codes[0], codes[1])

def test_nan_in_calibration_is_a_clear_error():
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    calib = torch.full((2, 8), 5)
    with pytest.raises(CalibrationError, match="NaN"):
        quantize_model(model, calib, "rtn", QuantSettings(), progress=False)


def test_bad_calibration_shapes_and_ids():
    model = tiny_llama()
    with pytest.raises(CalibrationError, match="non-empty"):
        quantize_model(model, torch.zeros(0, dtype=torch.long), "rtn", progress=False)
    with pytest.raises(CalibrationError, match="token ids"):
        quantize_model(model, torch.full((1, 4), 1000), "rtn", progress=False)


def test_unknown_architecture_and_method():
    class NotALlama(torch.nn.Module):
        config = type("C", (), {"model_type": "gpt2"})()

    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        get_adapter(NotALlama())
    from quantcompose.errors import UnknownStrategyError

    with pytest.raises(UnknownStrategyError, match="rtn"):
        quantize_model(tiny_llama(), torch.zeros(1, 4, dtype=torch.long), "nosuch", progress=False)


def test_split_absorbable():
    from quantcompose.models import InputPlace

    def place(absorbable, shared_heads=None):
        return InputPlace("x", ("o",), None if absorbable == "none" else "v", "linear", absorbable, "attention",
                          None, shared_heads)

    s = Scale(torch.tensor([1.0, 2.0]))
    p = Permutation(torch.tensor([1, 0]))
    absorbed, online = split_absorbable(Compose([s, p]), place("diagonal"))
    assert absorbed is s and online is p
    assert split_absorbable(p, place("diagonal")) == (None, p)
    assert split_absorbable(Compose([s, p]), place("none"))[0] is None
    # two query heads of width 1 share one value head: only equal factors fold
    assert split_absorbable(Compose([s, p]), place("shared_diagonal", (2, 1))) == (None, Compose([s, p]))
    shared = Scale(torch.tensor([3.0, 3.0]))
    assert split_absorbable(Compose([shared, p]), place("shared_diagonal", (2, 1))) == (shared, p)


def _fold_tolerance(method: str, settings: QuantSettings) -> dict[str, float]:
    # transformers' RMSNorm computes in float32 even in a float64 model, so a
    # rotated residual stream (which changes what the norm rounds) is exact
    # only to float32 precision there; everything else is exact in float64.
    rotated = settings.residual_rotation or "model" in StrategyManager().info(method).scopes
    return dict(rtol=1e-5, atol=1e-6) if rotated else dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("residual_rotation", [False, True])
@pytest.mark.parametrize("method", sorted(StrategyManager().strategies()))
def test_every_installed_strategy_folds_exactly_on_a_toy_llama(method, residual_rotation):
    if residual_rotation and "model" in StrategyManager().info(method).scopes:
        pytest.skip("the strategy rotates the residual stream itself")
    model = tiny_llama(kv_heads=2).double()
    tokens = torch.randint(0, 128, (2, 24))
    before = _logits(model, tokens)
    options = {"block_size": 32, "steps": 4} if method == "duquant" else {}
    settings = QuantSettings(wbits=16, abits=16, storage_dtype="float32", residual_rotation=residual_rotation)
    quantize_model(model, torch.randint(0, 128, (3, 16)), method, settings, options, progress=False)
    torch.testing.assert_close(_logits(model, tokens), before, **_fold_tolerance(method, settings))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", TOY_ARCHS)
@pytest.mark.parametrize("method", sorted(StrategyManager().strategies()))
def test_every_strategy_is_exact_on_every_toy_architecture(method, arch, tied):
    """Llama, Mistral, Qwen2 (q/k/v biases), Phi-3 (fused qkv and gate_up), tied and untied, GQA."""
    model = tiny_model(arch, tied=tied, kv_heads=2).double()
    tokens = torch.randint(0, 128, (2, 20))
    before = _logits(model, tokens)
    options = {"block_size": 32, "steps": 2} if method == "duquant" else {}
    settings = QuantSettings(wbits=16, abits=16, storage_dtype="float32")
    quantize_model(model, torch.randint(0, 128, (2, 16)), method, settings, options, progress=False)
    torch.testing.assert_close(_logits(model, tokens), before, **_fold_tolerance(method, settings))


def test_per_group_gptq_in_the_pipeline_is_gptq():
    """Group size 16 with GPTQ gives other codes than rounding to nearest, and less error on its data.

    Layer 0's q_proj sees the same calibration inputs in both runs, and GPTQ
    minimises exactly ``‖X(W − Q)ᵀ‖`` on them, so it must do better there.
    """
    calib = torch.randint(0, 128, (4, 16))
    reference = tiny_llama()
    seen = []
    hook = reference.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    _logits(reference, calib)
    hook.remove()
    x = torch.cat(seen).reshape(-1, 96)
    w = reference.model.layers[0].self_attn.q_proj.weight.detach()
    errors, codes = {}, {}
    for quantizer in ("rtn", "gptq"):
        model = tiny_llama()
        settings = QuantSettings(wbits=3, abits=16, weight_group_size=16, weight_quantizer=quantizer,
                                 weight_clip_search=False)
        quantize_model(model, calib, "rtn", settings, progress=False)
        q_proj = model.model.layers[0].self_attn.q_proj
        assert q_proj.weight_spec.granularity == "group" and q_proj.weight_spec.group_size == 16
        assert q_proj.weight_scale.shape == (q_proj.out_features, q_proj.in_features // 16, 1)
        codes[quantizer] = q_proj.weight_codes.clone()
        errors[quantizer] = float((x @ (w - q_proj.dequantized_weight()).T).norm())
    assert not torch.equal(codes["rtn"], codes["gptq"])
    assert errors["gptq"] < 0.9 * errors["rtn"], errors
