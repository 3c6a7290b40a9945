"""Learned quantization at the layer scope: LWC, the learned activation clip, the trainer, OmniQuant."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from quantcompose.errors import CalibrationError, OptionError, ShapeError
from quantcompose.learning import (
    FakeQuantLayer,
    LearnableActClip,
    LearnableWeightClip,
    TrainOptions,
    clamp_to_bounds,
    layer_error,
    place_quantizers,
    train_layer,
)
from quantcompose.models import get_adapter
from quantcompose.pipeline import LayerJob, quantize_layer, quantize_model
from quantcompose.plugin_manager import StrategyManager
from quantcompose.quant import QuantSpec, fake_quantize
from quantcompose.quant.weight_quantizers import get_weight_quantizer
from quantcompose.strategy import LayerContext, QuantSettings
from quantcompose.transforms import Identity, Scale
from quantcompose_plugins import omniquant

from layer_inputs import FixedPlans, float_layer_inputs, held_out_error, layer_output, manager_of
from toymodel import tiny_llama

try:
    from realmodel import load_smollm2, requires_real_model
except ImportError:  # pragma: no cover - run from the repository root
    from tests.realmodel import load_smollm2, requires_real_model

W3A4 = QuantSettings(wbits=3, abits=4, weight_quantizer="rtn", weight_clip_search=False, act_clip_search=False,
                     qkv_bits=16)


def _manager() -> StrategyManager:
    manager = StrategyManager(load_entry_points=False)
    manager.register(omniquant)
    return manager


def _context(model, tokens, index: int, settings: QuantSettings, inputs=None) -> LayerContext:
    """The layer scope's view of layer ``index`` (its inputs run through the float layers before it)."""
    adapter = get_adapter(model)
    layers = adapter.layers()
    if inputs is None:
        inputs = float_layer_inputs(model, tokens, index)
    with torch.no_grad():
        outputs = [layer_output(layers[index](h, **kw)) for h, kw in inputs]
    places = adapter.places(layers[index])
    plans = {
        p.name: omniquant.OmniQuant().quantizer_plan(
            Identity(model.config.hidden_size if p.name != "mlp_down" else model.config.intermediate_size),
            {}, settings)
        for p in places
    }
    return LayerContext(index, layers[index], places, inputs, outputs, {}, plans, progress=False)


def _with_weight_outliers(model):
    """``model`` with one large weight per row of every linear, which clipping should learn to cut."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features != 128:
                rows = torch.arange(module.out_features)
                module.weight[rows, (7 * rows) % module.in_features] *= 12.0
    return model


def _fake_layer(ctx: LayerContext, learn_scale: bool = False) -> FakeQuantLayer:
    return FakeQuantLayer(ctx.layer, {p.name: place_quantizers(ctx.layer, p, ctx.plans[p.name], 4.0, learn_scale)
                                      for p in ctx.places})


def _with_scales(ctx: LayerContext) -> LayerContext:
    """``ctx`` whose plans start from random positive scales (LET's starting point)."""
    generator = torch.Generator().manual_seed(0)
    plans = {k: replace(p, transform=Scale(torch.rand(p.transform.size, generator=generator, dtype=torch.float64)
                                              + 0.5))
             for k, p in ctx.plans.items()}
    return replace(ctx, plans=plans)


def _options(**given):
    return omniquant.OmniQuant().resolve(given, W3A4)


# -- the differentiable quantizers ------------------------------------------------------


@pytest.mark.parametrize("spec", [QuantSpec(4, False, "channel"), QuantSpec(3, True, "channel"),
                                  QuantSpec(4, False, "group", 8)])
def test_frozen_bounds_clamped_and_rounded_reproduce_the_trained_grid(spec):
    torch.manual_seed(0)
    weight = torch.randn(6, 32)
    lwc = LearnableWeightClip(6, 32, spec)
    with torch.no_grad():  # bounds spread over (0.5, 1)
        lwc.beta.uniform_(0.0, 3.0)
        lwc.gamma.uniform_(0.0, 3.0)
    expected = lwc(weight).detach()
    frozen = fake_quantize(clamp_to_bounds(weight, lwc.frozen_bounds(), spec), spec)
    torch.testing.assert_close(frozen, expected, rtol=0, atol=1e-5)
    assert lwc.frozen_bounds().shape == (6, 32 // (spec.group_size or 32), 2)


def test_gradients_reach_both_clip_bounds_and_the_activation_clip():
    torch.manual_seed(0)
    weight, x = torch.randn(5, 16), torch.randn(7, 16)
    lwc = LearnableWeightClip(5, 16, QuantSpec(3, False, "channel"))
    act = LearnableActClip(QuantSpec(4, False, "token"))
    (act(x) @ lwc(weight).T - x @ weight.T).pow(2).sum().backward()
    for grad in (lwc.beta.grad, lwc.gamma.grad):
        assert grad is not None and bool((grad != 0).all())  # every row's bounds are trained
    assert act.logit.grad is not None and float(act.logit.grad) != 0.0


def test_clamp_to_bounds_rejects_bounds_of_the_wrong_shape():
    with pytest.raises(ShapeError, match=r"expected \(4, 2, 2\)"):
        clamp_to_bounds(torch.randn(4, 16), torch.ones(4, 2), QuantSpec(4, False, "group", 8))


# -- the layer runner and the trainer on a toy layer -------------------------------------------


def test_fake_layer_at_full_clip_leaves_the_layer_untouched_and_its_gradients_reach_every_place():
    model = tiny_llama()
    ctx = _context(model, torch.randint(0, 128, (4, 16)), 1, W3A4)
    before = {k: v.clone() for k, v in ctx.layer.state_dict().items()}
    fake = _fake_layer(ctx)
    hidden, kwargs = ctx.inputs[0]
    torch.nn.functional.mse_loss(fake(hidden, kwargs), ctx.fp_outputs[0]).backward()
    assert set(fake.weight_clips) == set(fake.act_clips) == {"attn_in", "attn_out", "mlp_in", "mlp_down"}
    for place, lwc in fake.weight_clips.items():
        assert lwc.gamma.grad is not None and float(lwc.gamma.grad.abs().sum()) > 0, place
        assert float(lwc.beta.grad.abs().sum()) > 0, place
    for place, clip in fake.act_clips.items():
        assert clip.logit.grad is not None and float(clip.logit.grad) != 0.0, place
    fake.close()
    for name, value in ctx.layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not ctx.layer.self_attn.q_proj._forward_pre_hooks


def test_gradients_reach_the_learnable_scales_and_an_untrained_scale_is_exact_in_float():
    model = tiny_llama()
    ctx = _with_scales(_context(model, torch.randint(0, 128, (2, 12)), 0, W3A4))
    fake = _fake_layer(ctx, learn_scale=True)
    hidden, kwargs = ctx.inputs[0]
    torch.nn.functional.mse_loss(fake(hidden, kwargs), ctx.fp_outputs[0]).backward()
    assert set(fake.scales) == {"attn_in", "attn_out", "mlp_in", "mlp_down"}
    for place, scale in fake.scales.items():
        assert scale.log_s.grad is not None and bool((scale.log_s.grad != 0).any()), place
    # Without quantizers the scales cancel: the fake layer computes the float layer.
    float_plans = {k: replace(p, act_spec=None, weight_spec=None) for k, p in ctx.plans.items()}
    exact = _fake_layer(replace(ctx, plans=float_plans), learn_scale=True)
    with torch.no_grad():
        torch.testing.assert_close(exact(hidden, kwargs), ctx.fp_outputs[0], rtol=1e-4, atol=1e-5)


def test_training_lowers_the_loss_and_the_same_seed_gives_the_same_result():
    model = _with_weight_outliers(tiny_llama())
    ctx = _context(model, torch.randint(0, 128, (8, 24)), 0, W3A4)

    def run():
        fake = _fake_layer(ctx)
        groups = [{"params": list(fake.parameters()), "lr": 0.5}]
        report = train_layer(ctx, groups, fake, TrainOptions(epochs=3, batch_size=2, progress=False))
        return report, fake

    first, fake = run()
    assert first.steps == 3 * 4
    assert first.epoch_losses[-1] < 0.9 * first.epoch_losses[0], first.epoch_losses
    second, fake2 = run()
    assert second.epoch_losses == first.epoch_losses
    for a, b in zip(fake.parameters(), fake2.parameters()):
        assert torch.equal(a, b)
    assert layer_error(ctx, fake) < layer_error(ctx, _fake_layer(ctx))


def test_a_nan_loss_stops_training_with_an_error_naming_the_layer():
    model = tiny_llama()
    ctx = _context(model, torch.randint(0, 128, (4, 16)), 1, W3A4)
    ctx.fp_outputs[0][0, 3, 5] = float("nan")
    fake = _fake_layer(ctx)
    with pytest.raises(CalibrationError, match="layer 1: the training loss is nan"):
        train_layer(ctx, [{"params": list(fake.parameters()), "lr": 0.01}], fake,
                    TrainOptions(epochs=1, progress=False))


# -- OmniQuant through the pipeline ---------------------------------------------------------


def test_omniquant_plans_freeze_the_learned_clips_and_the_pipeline_quantizes_what_was_trained():
    model = tiny_llama()
    ctx = _context(model, torch.randint(0, 128, (4, 16)), 0, W3A4)
    strategy = omniquant.OmniQuant()
    options = _options(epochs=3, lr=0.3, act_lr=0.3)
    plans = strategy.fit_layer(ctx, options, W3A4)
    again = strategy.fit_layer(ctx, options, W3A4)  # same seed, same result
    for name, plan in plans.items():
        assert torch.equal(plan.weight_clip_rows, again[name].weight_clip_rows)
        assert plan.act_spec == again[name].act_spec
    for name, plan in plans.items():
        assert not plan.search_weight_clip and not plan.search_act_clip
        assert plan.weight_clip_rows is not None and plan.weight_clip_rows.shape[1:] == (1, 2)
        assert 0.0 < plan.act_spec.clip_ratio < 1.0 and plan.weight_spec.clip_ratio == 1.0
        assert plan.notes["loss_final"] < plan.notes["loss_epoch1"]

    # The frozen plans, quantized by the pipeline with round-to-nearest weights,
    # compute what the trained fake-quantized layer computed.
    fake = _fake_layer(ctx)
    for name, q in fake.places.items():
        with torch.no_grad():
            bounds = plans[name].weight_clip_rows
            q.weight.beta.copy_(torch.logit(bounds[..., :1].double()).float())
            q.weight.gamma.copy_(torch.logit(bounds[..., 1:].double()).float())
            q.act.logit.copy_(torch.logit(torch.tensor(plans[name].act_spec.clip_ratio, dtype=torch.float64)))
    layer = copy.deepcopy(ctx.layer)
    job = LayerJob(layer=layer, index=0, places=ctx.places, inputs=ctx.inputs, strategy=FixedPlans(plans),
                   options={}, settings=W3A4, weight_quantizer=get_weight_quantizer("rtn"),
                   generator=torch.Generator().manual_seed(0))
    quantize_layer(job)
    hidden, kwargs = ctx.inputs[0]
    with torch.no_grad():
        expected = fake(hidden, kwargs)
        got = layer_output(layer(hidden, **kwargs))
    # A few activation codes may round the other way (float32 vs the reference's order of operations).
    assert float((got - expected).pow(2).mean()) < 1e-3 * float(expected.pow(2).mean())


def test_a_plan_with_fixed_clips_and_the_clip_search_is_refused():
    model = tiny_llama()
    ctx = _context(model, torch.randint(0, 128, (2, 8)), 0, W3A4)
    plans = {k: replace(p, weight_clip_rows=torch.ones(p.transform.size, 1, 2), search_weight_clip=True)
             for k, p in ctx.plans.items()}
    job = LayerJob(layer=ctx.layer, index=0, places=ctx.places, inputs=ctx.inputs, strategy=FixedPlans(plans),
                   options={}, settings=W3A4, weight_quantizer=get_weight_quantizer("rtn"),
                   generator=torch.Generator().manual_seed(0))
    with pytest.raises(CalibrationError, match="weight_clip_rows"):
        quantize_layer(job)


def test_omniquant_at_16_bits_leaves_the_logits_unchanged_and_at_w4a4_runs_end_to_end():
    model = tiny_llama().double()
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        before = model(tokens).logits
    calib = torch.randint(0, 128, (3, 16))
    quantize_model(model, calib, "omniquant", QuantSettings(wbits=16, abits=16, storage_dtype="float32"), manager=_manager(), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=1e-9, atol=1e-9)

    quantized = tiny_llama()
    report = quantize_model(quantized, calib, "omniquant", QuantSettings(wbits=4, abits=4), {"epochs": 1},
                            manager=_manager(), progress=False)
    assert all(p["clip"] == "learned" for p in report.places)
    with torch.no_grad():
        assert bool(torch.isfinite(quantized(tokens).logits).all())


class _TrainedThenFloat(omniquant.OmniQuant):
    """OmniQuant trained at W3A4, then its plans applied with nothing quantized: only the learned scales fold."""

    name = "test-omniquant-float"

    def __init__(self):
        self.changed: list[float] = []

    def fit_layer(self, layer, options, settings):
        quantized = {k: replace(p, act_spec=W3A4.act_spec(), weight_spec=W3A4.weight_spec())
                     for k, p in layer.plans.items()}
        trained = super().fit_layer(replace(layer, plans=quantized), options, W3A4)
        for name, plan in trained.items():
            start = layer.plans[name].transform
            if isinstance(start, Scale):
                self.changed.append(float((plan.transform.factors - start.factors).abs().max()))
        return {k: replace(p, act_spec=None, weight_spec=None, weight_clip_rows=None) for k, p in trained.items()}


def test_omniquant_trained_scales_folded_at_16_bits_leave_the_logits_unchanged():
    model = tiny_llama().double()
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        before = model(tokens).logits
    strategy = _TrainedThenFloat()
    manager = manager_of(strategy)
    report = quantize_model(model, torch.randint(0, 128, (4, 16)), strategy.name,
                            QuantSettings(wbits=16, abits=16, storage_dtype="float32"), {"epochs": 2, "let_lr": 0.05},
                            manager=manager, progress=False)
    assert len(strategy.changed) >= 4 and min(strategy.changed) > 1e-3  # the scales did train
    assert {p["folded"] for p in report.places} >= {"Scale"}
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=1e-9, atol=1e-9)


def test_omniquant_options_are_checked():
    with pytest.raises(OptionError, match="epochs"):
        _options(epochs=0)
    with pytest.raises(OptionError, match="lr"):
        _options(lr=-1.0)
    assert omniquant.OmniQuant.scopes() == ("layer", "place")


# -- the real model ------------------------------------------------------------------------


@pytest.mark.slow
@requires_real_model
def test_on_smollm2_layer_3_training_lowers_the_loss_and_beats_round_to_nearest_on_held_out_rows():
    model, _ = load_smollm2()
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (6, 128))
    settings = QuantSettings(wbits=4, abits=4, weight_quantizer="rtn", weight_clip_search=False,
                             act_clip_search=False, qkv_bits=16)
    full = _context(model, tokens, 3, settings)  # read-only use of the shared model
    train = full.inputs[0]  # 4 training sequences; full.inputs[1] (2 sequences) is held out
    ctx = replace(full, inputs=[train], fp_outputs=[full.fp_outputs[0]])
    plans = omniquant.OmniQuant().fit_layer(ctx, _options(epochs=3, lr=0.1, act_lr=0.1), settings)
    notes = plans["attn_in"].notes
    assert notes["loss_final"] < notes["loss_epoch1"], notes

    rtn, learned = (held_out_error(full, p, 0, 1, settings) for p in (full.plans, plans))
    assert learned < 0.9 * rtn, (learned, rtn)


def test_batches_cover_the_first_samples_once_per_epoch_in_a_seeded_order():
    from quantcompose.learning import calibration_batches

    hidden = [torch.arange(4.0).reshape(4, 1, 1).expand(4, 3, 2), 4 + torch.arange(2.0).reshape(2, 1, 1).expand(2, 3, 2)]
    ctx = LayerContext(0, torch.nn.Identity(), [], [(h, {"mask": None}) for h in hidden], hidden, {}, {})
    seen = [float(v) for h, _, _ in calibration_batches(ctx, 2, torch.Generator().manual_seed(1), 5)
            for v in h[:, 0, 0]]
    assert sorted(seen) == [0.0, 1.0, 2.0, 3.0, 4.0]
    again = [float(v) for h, _, _ in calibration_batches(ctx, 2, torch.Generator().manual_seed(1), 5)
             for v in h[:, 0, 0]]
    assert again == seen
