"""FlatQuant: learnable Kronecker transforms, smoothing scales and clips trained at the layer scope."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from quantcompose.errors import OptionError, ShapeError, TransformError
from quantcompose.learning import FakeQuantLayer, place_quantizers
from quantcompose.models import get_adapter, get_submodule
from quantcompose.pipeline import quantize_model
from quantcompose.saving import load_quantized, save_quantized
from quantcompose.strategy import LayerContext, PlaceStats, QuantSettings
from quantcompose.transforms import Compose, Kronecker, Scale
from quantcompose.transforms.learnable import LearnableKronecker
from quantcompose_plugins import flatquant

from layer_inputs import float_layer_inputs, held_out_error, layer_output, manager_of
from toymodel import tiny_llama

try:
    from realmodel import load_smollm2, requires_real_model
except ImportError:  # pragma: no cover - run from the repository root
    from tests.realmodel import load_smollm2, requires_real_model

W4A4 = QuantSettings(wbits=4, abits=4, weight_quantizer="rtn", weight_clip_search=False, act_clip_search=False,
                     qkv_bits=16)
STRATEGY = flatquant.FlatQuant()


def _options(**given):
    return STRATEGY.resolve(given, W4A4)


def _context(model, tokens, index: int, settings: QuantSettings = W4A4, options=None) -> LayerContext:
    """Layer ``index``'s layer-scope view with flatquant's place plans (SmoothQuant scales from the inputs' maxima)."""
    layer = get_adapter(model).layers()[index]
    places = get_adapter(model).places(layer)
    inputs = float_layer_inputs(model, tokens, index)
    absmax: dict[str, torch.Tensor] = {}

    def recorder(name):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
            absmax[name] = x if name not in absmax else torch.maximum(absmax[name], x)
        return hook

    hooks = [get_submodule(layer, p.linears[0]).register_forward_pre_hook(recorder(p.name)) for p in places]
    with torch.no_grad():
        outputs = [layer_output(layer(h, **kw)) for h, kw in inputs]
    for h in hooks:
        h.remove()
    options = options or _options()
    plans = {}
    for p in places:
        weights = {n: get_submodule(layer, n).weight.detach().float() for n in p.linears}
        stats = PlaceStats(index, p.name, absmax[p.name], torch.zeros(0, absmax[p.name].numel()), weights,
                           p.absorbable)
        plans[p.name] = STRATEGY.plan(stats, options, settings)
    return LayerContext(index, layer, places, inputs, outputs, {}, plans, progress=False)


def _tokens(n: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


# -- factor sizes and starting factors ---------------------------------------------------


def test_factor_sizes_are_the_closest_pair_and_a_prime_width_is_refused():
    assert flatquant.kronecker_factors(576) == (24, 24)
    assert flatquant.kronecker_factors(1536) == (32, 48)
    assert flatquant.kronecker_factors(224) == (14, 16)
    for bad in (577, 2, 3.0):
        with pytest.raises(ShapeError, match="Kronecker"):
            flatquant.kronecker_factors(bad)


@pytest.mark.parametrize("init", flatquant.INITS)
def test_starting_factors_are_orthogonal_and_seeded(init):
    for size in (12, 14):  # 14 has no Hadamard matrix
        a = flatquant.initial_factor(size, init, torch.Generator().manual_seed(1))
        b = flatquant.initial_factor(size, init, torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
        torch.testing.assert_close(a @ a.T, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)


def test_options_are_checked():
    with pytest.raises(OptionError, match="init"):
        _options(init="random")
    with pytest.raises(OptionError, match="epochs"):
        _options(epochs=0)
    assert flatquant.FlatQuant.scopes() == ("layer", "place")


# -- the fake-quantized layer with a learnable Kronecker --------------------------------------


def _fake(ctx: LayerContext, seed: int = 0) -> FakeQuantLayer:
    generator = torch.Generator().manual_seed(seed)
    quantizers = {}
    for p in ctx.places:
        plan = ctx.plans[p.name]
        m, n = flatquant.kronecker_factors(plan.transform.size)
        kron = LearnableKronecker(m, n, flatquant.initial_factor(m, "orthogonal", generator),
                                  flatquant.initial_factor(n, "orthogonal", generator))
        quantizers[p.name] = place_quantizers(ctx.layer, p, plan, 4.0, learn_scale=True, kronecker=kron)
    return FakeQuantLayer(ctx.layer, quantizers)


def test_gradients_reach_the_kronecker_factors_scales_and_clips():
    ctx = _context(tiny_llama(), _tokens(2, 12), 0)
    fake = _fake(ctx)
    hidden, kwargs = ctx.inputs[0]
    torch.nn.functional.mse_loss(fake(hidden, kwargs), ctx.fp_outputs[0]).backward()
    names = {"attn_in", "attn_out", "mlp_in", "mlp_down"}
    assert set(fake.kroneckers) == set(fake.scales) == set(fake.weight_clips) == set(fake.act_clips) == names
    for place in names:
        kron = fake.kroneckers[place]
        for factor in (kron.A, kron.B):
            assert factor.grad is not None and float(factor.grad.abs().sum()) > 0, place
        assert bool((fake.scales[place].log_s.grad != 0).any()), place
        assert float(fake.weight_clips[place].gamma.grad.abs().sum()) > 0, place
        assert float(fake.act_clips[place].logit.grad) != 0.0, place
    fake.close()


def test_without_quantizers_the_learnable_transforms_cancel():
    ctx = _context(tiny_llama(), _tokens(2, 12), 1)
    ctx = replace(ctx, plans={k: replace(p, act_spec=None, weight_spec=None) for k, p in ctx.plans.items()})
    fake = _fake(ctx, seed=3)
    hidden, kwargs = ctx.inputs[0]
    with torch.no_grad():
        torch.testing.assert_close(fake(hidden, kwargs), ctx.fp_outputs[0], rtol=1e-4, atol=1e-5)


def test_a_kronecker_of_the_wrong_width_is_refused():
    ctx = _context(tiny_llama(), _tokens(2, 12), 0)
    place = ctx.places[0]
    with pytest.raises(ShapeError, match="width 96"):
        place_quantizers(ctx.layer, place, ctx.plans[place.name], 4.0, kronecker=LearnableKronecker(4, 4))


# -- fit_layer and the frozen plans -----------------------------------------------------------


def test_fit_layer_freezes_scale_then_kronecker_and_the_same_seed_gives_the_same_plans():
    ctx = _context(tiny_llama(), _tokens(4, 16), 1)
    options = _options(epochs=2, samples=0)
    first = STRATEGY.fit_layer(ctx, options, W4A4)
    second = STRATEGY.fit_layer(ctx, options, W4A4)
    for name, plan in first.items():
        transform = plan.transform
        assert isinstance(transform, Compose) and [type(t) for t in transform] == [Scale, Kronecker], name
        assert plan.notes["loss_final"] < plan.notes["loss_epoch1"], plan.notes
        assert plan.weight_clip_rows is not None and not plan.search_weight_clip
        other = second[name].transform
        assert torch.equal(transform[1].A, other[1].A) and torch.equal(transform[0].factors, other[0].factors)
        assert torch.equal(plan.weight_clip_rows, second[name].weight_clip_rows)
    # Nothing quantized: nothing to learn, the closed-form plans stay.
    assert STRATEGY.fit_layer(ctx, options, QuantSettings(wbits=16, abits=16)) is None


def test_a_singular_learned_factor_is_an_error_naming_the_layer_and_place():
    kron = LearnableKronecker(4, 6)
    with torch.no_grad():
        kron.A[1] = kron.A[0]
    with pytest.raises(TransformError, match=r"flatquant layer 7, place 'mlp_in'.*singular"):
        flatquant._frozen_transform(Scale(torch.ones(24)), kron, 7, "mlp_in")


class _TrainedThenFloat(flatquant.FlatQuant):
    """FlatQuant trained at W4A4, then its plans applied with nothing quantized: only the learned transforms fold."""

    name = "test-flatquant-float"

    def fit_layer(self, layer, options, settings):
        quantized = {k: replace(p, act_spec=W4A4.act_spec(), weight_spec=W4A4.weight_spec())
                     for k, p in layer.plans.items()}
        trained = super().fit_layer(replace(layer, plans=quantized), options, W4A4)
        return {k: replace(p, act_spec=None, weight_spec=None, weight_clip_rows=None) for k, p in trained.items()}


def test_trained_transforms_folded_at_16_bits_leave_the_logits_unchanged():
    model = tiny_llama().double()
    tokens = _tokens(2, 20, seed=5)
    with torch.no_grad():
        before = model(tokens).logits
    strategy = _TrainedThenFloat()
    report = quantize_model(model, _tokens(4, 16), strategy.name,
                            QuantSettings(wbits=16, abits=16, storage_dtype="float32"), {"epochs": 2, "lr": 0.05},
                            manager=manager_of(strategy), progress=False)
    assert {p["online"] for p in report.places} >= {"Kronecker"}  # the Kronecker runs online, the scale folds
    assert "Scale" in {p["folded"] for p in report.places}
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=1e-9, atol=1e-9)


def test_w4a4_through_the_pipeline_saves_and_loads_to_identical_logits(tmp_path):
    model = tiny_llama()
    report = quantize_model(model, _tokens(4, 16), "flatquant", W4A4, {"epochs": 1}, manager=manager_of(STRATEGY),
                            progress=False)
    assert all(p["clip"] == "learned" for p in report.places)
    tokens = _tokens(2, 20, seed=5)
    with torch.no_grad():
        expected = model(tokens).logits
    assert bool(torch.isfinite(expected).all())
    save_quantized(model, tmp_path / "fq")
    loaded, _ = load_quantized(tmp_path / "fq")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected)


# -- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
@requires_real_model
def test_on_smollm2_layer_3_training_lowers_the_loss_and_beats_the_closed_form_plan_on_held_out_rows():
    model, _ = load_smollm2()
    tokens = torch.randint(0, model.config.vocab_size, (6, 128), generator=torch.Generator().manual_seed(0))
    full = _context(model, tokens, 3)  # read-only use of the shared model
    train = full.inputs[0]  # 4 training sequences; full.inputs[1] (2 sequences) is held out
    ctx = replace(full, inputs=[train], fp_outputs=[full.fp_outputs[0]])
    plans = STRATEGY.fit_layer(ctx, _options(epochs=2), W4A4)
    notes = plans["attn_in"].notes
    assert notes["loss_final"] < 0.95 * notes["loss_epoch1"], notes

    # The closed-form plan: SmoothQuant's scale, no clipping (measured 0.307 against 0.078 trained, 3 epochs).
    closed, learned = (held_out_error(full, p, 0, 1, W4A4) for p in (full.plans, plans))
    assert learned < 0.5 * closed, (learned, closed)


def test_the_user_guide_lists_every_option_with_its_default():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "user-guide.md").read_text(encoding="utf-8")
    section = text.split("### FlatQuant", 1)[1].split("\n### ", 1)[0]
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip() for line in section.splitlines()
            if line.startswith("| `")}
    assert rows == {k: str(o.default) for k, o in flatquant.FlatQuant.options.items()}
