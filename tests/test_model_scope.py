"""Model scope: fused norms, untied head, rotated residual stream and value heads; QuaRot as the paper does it."""

from __future__ import annotations

import copy

import pytest
import torch

from quantcompose.errors import CalibrationError, TransformError
from quantcompose.model_scope import apply_model_plan, model_facts, residual_hadamard_plan
from quantcompose.models import get_adapter
from quantcompose.pipeline import quantize_model
from quantcompose.qlinear import QuantLinear
from quantcompose.strategy import ModelPlan, QuantSettings
from quantcompose.transforms import BlockRotation, Hadamard, Scale, random_orthogonal

from toymodel import tiny_llama


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# transformers' RMSNorm computes in float32 even in a float64 model (see test_pipeline._fold_tolerance).
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_each_model_rewrite_is_exact(kv_heads):
    model = tiny_llama(kv_heads=kv_heads).double()
    tokens = torch.randint(0, 128, (2, 20))
    before = _logits(model, tokens)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    head = BlockRotation([random_orthogonal(adapter.head_dim, g)])
    plan = ModelPlan(fuse_norms=True, residual=Hadamard.random(96, g), value_head=head)
    apply_model_plan(adapter, plan)
    torch.testing.assert_close(_logits(model, tokens), before, **TOL)
    assert not adapter.tied_embeddings() and model.config.tie_word_embeddings is False
    for layer in adapter.layers():
        assert torch.equal(layer.input_layernorm.weight, torch.ones(96, dtype=torch.float64))
        assert torch.equal(layer.post_attention_layernorm.weight, torch.ones(96, dtype=torch.float64))
    assert torch.equal(model.model.norm.weight, torch.ones(96, dtype=torch.float64))


def test_fused_norms_alone_are_exact_in_float64():
    model = tiny_llama().double()
    tokens = torch.randint(0, 128, (2, 20))
    before = _logits(model, tokens)
    apply_model_plan(get_adapter(model), ModelPlan(fuse_norms=True))
    torch.testing.assert_close(_logits(model, tokens), before, rtol=1e-9, atol=1e-9)


def test_model_plans_that_cannot_be_exact_are_refused():
    adapter = get_adapter(tiny_llama())
    with pytest.raises(TransformError, match="needs fuse_norms"):
        apply_model_plan(adapter, ModelPlan(residual=Hadamard(96)))
    with pytest.raises(TransformError, match="not orthogonal"):
        apply_model_plan(adapter, ModelPlan(fuse_norms=True, residual=Scale(torch.full((96,), 2.0))))
    with pytest.raises(TransformError, match="hidden size is 96"):
        apply_model_plan(adapter, ModelPlan(fuse_norms=True, residual=Hadamard(64)))
    with pytest.raises(TransformError, match="head size is 24"):
        apply_model_plan(adapter, ModelPlan(value_head=Hadamard(16)))


def test_quarot_runs_online_transforms_only_before_down_proj_and_o_proj():
    model = tiny_llama(kv_heads=2)
    report = quantize_model(model, torch.randint(0, 128, (2, 16)), "quarot", QuantSettings(wbits=4, abits=4),
                            progress=False)
    assert report.model_plan == {
        "fuse_norms": True, "residual": "Hadamard(96)", "value_head": "Hadamard(24)", "qk_rotation": "Hadamard(24)"
    }
    online = {(p["layer"], p["place"]): p["online"] for p in report.places}
    for layer in range(2):
        assert online[(layer, "attn_in")] == "-" and online[(layer, "mlp_in")] == "-"
        assert online[(layer, "mlp_down")] == "Hadamard"
        assert online[(layer, "attn_out")] == "Permutation·BlockRotation·Permutation"  # heads ⊗ I_d
    per_layer = [
        sum(1 for m in layer.modules() if isinstance(m, QuantLinear) and m.transform is not None)
        for layer in model.model.layers
    ]
    assert per_layer == [2, 2]  # o_proj and down_proj


def test_residual_rotation_composes_with_any_place_strategy_and_is_seeded():
    def run(seed):
        model = tiny_llama().double()
        settings = QuantSettings(wbits=16, abits=16, storage_dtype="float32", residual_rotation=True, seed=seed)
        report = quantize_model(model, torch.randint(0, 128, (2, 16)), "duquant", settings,
                                {"block_size": 32, "steps": 2}, progress=False)
        return model.model.embed_tokens.weight.clone(), report

    a, report = run(0)
    assert report.model_plan["residual"] == "Hadamard(96)"
    assert torch.equal(a, run(0)[0]) and not torch.equal(a, run(1)[0])


def test_a_second_residual_rotation_is_refused():
    with pytest.raises(CalibrationError, match="rotates the residual stream itself"):
        quantize_model(tiny_llama(), torch.randint(0, 128, (2, 8)), "quarot",
                       QuantSettings(residual_rotation=True), progress=False)


def test_model_scope_changes_survive_save_and_load(tmp_path):
    from quantcompose.saving import load_quantized, save_quantized

    model = tiny_llama()
    quantize_model(model, torch.randint(0, 128, (2, 16)), "quarot", QuantSettings(wbits=4, abits=4), progress=False)
    save_quantized(model, tmp_path / "quarot")
    loaded, _ = load_quantized(tmp_path / "quarot")
    tokens = torch.randint(0, 128, (2, 20))
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.layers[0].input_layernorm.weight, torch.ones(96))
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))
    from quantcompose.attention_quant import attention_quantizer_of

    # Q/K/V quantizers and QuaRot's online Q/K Hadamard are part of the saved model.
    assert attention_quantizer_of(loaded.model.layers[1].self_attn) == attention_quantizer_of(model.model.layers[1].self_attn)


def test_facts_come_from_the_adapter():
    facts = model_facts(get_adapter(tiny_llama(kv_heads=2)))
    assert (facts.hidden_size, facts.head_dim, facts.num_heads, facts.num_kv_heads) == (96, 24, 4, 2)
    assert facts.tied_embeddings and facts.num_layers == 2
    plan = residual_hadamard_plan(facts, seed=3)
    assert plan.fuse_norms and plan.residual.size == 96


# ---------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_residual_rotation_removes_the_outlier_channels_of_the_real_model():
    """On real text, QuaRot's rotation leaves the residual stream with no outlier channel."""
    from realmodel import load_smollm2, requires_real_model, wikitext2_test_tokens

    if requires_real_model.args[0]:
        pytest.skip(requires_real_model.kwargs["reason"])
    reference, _ = load_smollm2()
    model = copy.deepcopy(reference)
    tokens = wikitext2_test_tokens()[:, :512]

    def channel_ratio(m):
        # The residual stream as the layers see it: each decoder layer's input, pooled over tokens.
        ratios = []
        handles = [
            layer.register_forward_pre_hook(
                lambda mod, args: ratios.append(_ratio(args[0]))
            )
            for layer in m.model.layers[1:]
        ]
        try:
            _logits(m, tokens)
        finally:
            for h in handles:
                h.remove()
        return torch.tensor(ratios)

    before = channel_ratio(reference)
    adapter = get_adapter(model)
    apply_model_plan(adapter, residual_hadamard_plan(model_facts(adapter), seed=0))
    after = channel_ratio(model)
    # Measured on these 512 tokens, the largest per-channel max |x| over the median one, layers 1-29:
    # before, median 439 (lowest 7.2); after the rotation, median 1.38 (highest 1.86).
    assert float(after.max()) < 3.0, after
    assert float(before.median()) > 50 * float(after.median()), (before, after)


def _ratio(hidden: torch.Tensor) -> float:
    per_channel = hidden.detach().abs().reshape(-1, hidden.shape[-1]).amax(dim=0)
    return float(per_channel.max() / per_channel.median())
