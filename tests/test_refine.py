"""Learned refinement of place-scope strategies (``QuantSettings.refine = "lwc"``)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from quantcompose import pipeline
from quantcompose.errors import OptionError, QuantSpecError, RecipeError
from quantcompose.learning import FakeQuantLayer
from quantcompose.learning.refine import closed_form_plan, learnable_quantizers
from quantcompose.models import get_adapter
from quantcompose.pipeline import LayerJob, quantize_layer, quantize_model
from quantcompose.plugin_manager import get_plugin_manager
from quantcompose.qlinear import QuantLinear
from quantcompose.quant.weight_quantizers import get_weight_quantizer
from quantcompose.recipe import Recipe
from quantcompose.saving import load_quantized, save_quantized
from quantcompose.strategy import QuantSettings

from layer_inputs import float_layer_inputs, layer_output
from toymodel import tiny_llama

try:
    from realmodel import load_smollm2, requires_real_model
except ImportError:  # pragma: no cover - run from the repository root
    from tests.realmodel import load_smollm2, requires_real_model

REFINED = QuantSettings(wbits=4, abits=4, weight_quantizer="rtn", qkv_bits=16, refine="lwc", refine_epochs=2)


def _tokens(n: int = 6, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _captured_contexts(monkeypatch) -> list:
    """The ``LayerContext`` of every layer the pipeline refines, recorded as it is handed over."""
    seen: list = []
    original = pipeline.refine_layer

    def record(ctx, settings):
        seen.append(replace(ctx, layer=copy.deepcopy(ctx.layer)))  # the pipeline quantizes the original next
        return original(ctx, settings)

    monkeypatch.setattr(pipeline, "refine_layer", record)
    return seen


def test_gradients_reach_every_weight_bound_and_activation_clip(monkeypatch):
    contexts = _captured_contexts(monkeypatch)
    quantize_model(tiny_llama(), _tokens(), "duquant", REFINED, progress=False)
    ctx = contexts[0]
    plans = {p.name: closed_form_plan(ctx, p, ctx.plans[p.name]) for p in ctx.places}
    fake = FakeQuantLayer(ctx.layer, learnable_quantizers(ctx, plans))
    (hidden, kwargs), target = ctx.inputs[0], ctx.fp_outputs[0]
    with torch.enable_grad():
        torch.nn.functional.mse_loss(fake(hidden, kwargs), target.float()).backward()
    assert set(fake.weight_clips) == set(fake.act_clips) == {p.name for p in ctx.places}
    for name, clip in fake.weight_clips.items():
        for bound in (clip.beta, clip.gamma):
            assert bound.grad is not None and bound.grad.abs().sum() > 0, name
    for name, clip in fake.act_clips.items():
        assert clip.logit.grad is not None and clip.logit.grad != 0, name
    fake.close()


def test_training_starts_from_the_closed_form_clips(monkeypatch):
    """The searches' ratios are the starting point (capped at sigmoid(4) where they do not clip)."""
    contexts = _captured_contexts(monkeypatch)
    quantize_model(tiny_llama(), _tokens(), "duquant", REFINED, progress=False)
    ctx = contexts[0]
    plans = {p.name: closed_form_plan(ctx, p, ctx.plans[p.name]) for p in ctx.places}
    for plan in plans.values():
        assert not plan.search_act_clip and not plan.search_weight_clip
        assert plan.weight_clip_rows.shape[-1] == 2 and plan.weight_spec.clip_ratio == 1.0
    quantizers = learnable_quantizers(ctx, plans)
    cap = torch.sigmoid(torch.tensor(4.0))
    for name, q in quantizers.items():
        expected = plans[name].weight_clip_rows.clamp(max=float(cap))
        torch.testing.assert_close(q.weight.frozen_bounds(), expected, atol=1e-6, rtol=0)
        assert q.act.frozen_ratio() == pytest.approx(min(plans[name].act_spec.clip_ratio, float(cap)), abs=1e-6)


def test_refined_plans_replace_the_clip_searches_and_quantize_with_the_learned_clips():
    model = tiny_llama()
    report = quantize_model(model, _tokens(), "duquant", REFINED, progress=False)
    for entry in report.places:
        assert entry["clip"] == "learned (lwc)"
        assert entry["loss_final"] > 0
    ratios = {m.act_spec.clip_ratio for m in model.modules() if isinstance(m, QuantLinear)}
    # Learned ratios are off the search grid (steps of 0.025) and below 1.
    assert all(0 < r < 1 for r in ratios) and any(abs(r * 40 - round(r * 40)) > 1e-3 for r in ratios)


def test_the_same_seed_gives_the_same_model_and_save_load_keeps_its_logits(tmp_path):
    tokens = _tokens()
    first, second = tiny_llama(), tiny_llama()
    quantize_model(first, tokens, "duquant", REFINED, progress=False)
    quantize_model(second, tokens, "duquant", REFINED, progress=False)
    assert torch.equal(_logits(first, tokens), _logits(second, tokens))
    save_quantized(first, tmp_path / "m")
    assert torch.equal(_logits(load_quantized(tmp_path / "m")[0], tokens), _logits(first, tokens))


@pytest.mark.parametrize("method, quantizer", [("rtn", "rtn"), ("smoothquant", "rtn"), ("quarot", "gptq"),
                                               ("duquant", "gptq")])
def test_refinement_changes_the_model_for_every_place_scope_strategy_and_both_weight_quantizers(method, quantizer):
    tokens = _tokens(4, 16)
    base = QuantSettings(wbits=4, abits=4, weight_quantizer=quantizer, qkv_bits=16)
    closed, refined = tiny_llama(), tiny_llama()
    quantize_model(closed, tokens, method, base, progress=False)
    quantize_model(refined, tokens, method, replace(base, refine="lwc"), progress=False)
    logits = _logits(refined, tokens)
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, _logits(closed, tokens))


@pytest.mark.parametrize("changes, error", [
    ({"refine": "lwcc"}, "refine='lwcc' is unknown"),
    ({"refine": "lwc", "refine_epochs": 0}, "refine_epochs=0"),
    ({"refine": "lwc", "refine_samples": -1}, "refine_samples=-1"),
    ({"refine": "lwc", "refine_lr": 0.0}, "refine_lr=0.0"),
    ({"refine": "lwc", "refine_lr": float("nan")}, "refine_lr=nan"),
    ({"refine_epochs": 3}, "refine is None"),
])
def test_bad_refine_values_are_refused_by_the_settings(changes, error):
    with pytest.raises(QuantSpecError, match=error.replace("(", r"\(")):
        QuantSettings(**changes)


@pytest.mark.parametrize("method, changes, error", [
    ("omniquant", {}, "fits whole layers itself"),
    ("duquant", {"wbits": 16, "abits": 16}, "wbits=16"),
    ("duquant", {"wbits": 16}, "wbits=16"),
    ("duquant", {"true_sequential": True}, "true_sequential"),
])
def test_refine_conflicts_are_refused_before_calibration(method, changes, error):
    settings = replace(REFINED, **changes)
    bad_tokens = torch.full((2, 8), 10_000)  # out of the vocabulary: calibration would refuse them next
    with pytest.raises(OptionError, match=error):
        quantize_model(tiny_llama(), bad_tokens, method, settings, progress=False)


def test_recipes_carry_the_refinement_and_refuse_bad_values():
    recipe = Recipe.from_dict({"method": "duquant", "refine": "lwc", "refine_epochs": 3, "refine_lr": 0.05})
    assert recipe.settings().refine == "lwc" and recipe.settings().refine_epochs == 3
    import tomllib

    assert Recipe.from_dict(tomllib.loads(recipe.to_toml().split("\n", 1)[1])) == recipe
    with pytest.raises(RecipeError, match="refine_lr must be a number"):
        Recipe.from_dict({"refine": "lwc", "refine_lr": "fast"})
    with pytest.raises(RecipeError, match="refine is None"):
        Recipe.from_dict({"refine_samples": 8})
    with pytest.raises(RecipeError, match="recipe key refine: .*fits whole layers itself"):
        Recipe.from_dict({"method": "omniquant", "refine": "lwc"}).resolve()


def test_the_cli_parses_the_refine_flags():
    from quantcompose.cli import build_parser

    args = build_parser().parse_args(["quantize", "--refine", "lwc", "--refine-epochs", "3", "--refine-lr", "0.05"])
    assert (args.refine, args.refine_epochs, args.refine_lr) == ("lwc", 3, 0.05)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--refine", "lwcc"])


# -- the real model ------------------------------------------------------------------------


@pytest.mark.slow
@requires_real_model
def test_on_smollm2_layer_3_refined_duquant_beats_the_closed_form_plan_on_held_out_rows():
    model, _ = load_smollm2()
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (6, 128))
    adapter = get_adapter(model)
    layers = adapter.layers()
    train, held_out = float_layer_inputs(model, tokens, 3)  # 4 calibration sequences, 2 held out
    with torch.no_grad():
        target = layer_output(layers[3](held_out[0], **held_out[1]))
    manager = get_plugin_manager()

    def quantized_layer(settings: QuantSettings):
        layer = copy.deepcopy(layers[3])
        job = LayerJob(layer=layer, index=3, places=adapter.places(layer), inputs=[train],
                       strategy=manager.get("duquant"), options=manager.resolve("duquant", {}, settings),
                       settings=settings, weight_quantizer=get_weight_quantizer(settings.weight_quantizer),
                       generator=torch.Generator().manual_seed(0), progress=False)
        return layer, quantize_layer(job)

    def held_out_error(layer) -> float:
        with torch.no_grad():
            return float((layer_output(layer(held_out[0], **held_out[1])) - target).pow(2).mean())

    base = QuantSettings(wbits=4, abits=4, weight_quantizer="rtn", qkv_bits=16)
    closed, _ = quantized_layer(base)
    refined, summary = quantized_layer(replace(base, refine="lwc", refine_epochs=3, refine_samples=0))
    notes = summary[0]
    assert notes["loss_final"] < notes["loss_epoch1"], notes
    assert held_out_error(refined) < held_out_error(closed), (held_out_error(refined), held_out_error(closed))
