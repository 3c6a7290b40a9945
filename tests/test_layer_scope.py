"""Layer scope: a strategy that sees a whole decoder layer, its inputs and full-precision outputs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from quantcompose.errors import CalibrationError
from quantcompose.hookspecs import hookimpl
from quantcompose.pipeline import quantize_model
from quantcompose.plugin_manager import StrategyManager
from quantcompose.quant import fake_quantize
from quantcompose.strategy import LayerContext, QuantSettings, Strategy
from quantcompose.transforms import Scale

from toymodel import tiny_llama


class LearnedDownScale(Strategy):
    """Fits a smoothing scale for ``mlp_down`` by gradient descent on the quantized output error.

    A stand-in for the learned methods: it reads the layer's statistics,
    trains a parameter through the straight-through fake quantizer, and
    freezes the result into an ordinary ``Scale`` atom.
    """

    name = "test-learned-down-scale"
    description = "test strategy at the layer scope"

    def __init__(self) -> None:
        self.seen: list[LayerContext] = []
        self.losses: list[tuple[float, float]] = []

    def fit_layer(self, layer, options, settings):
        self.seen.append(layer)
        stats = layer.stats["mlp_down"]
        x = stats.act_sample.double()
        (w,) = [v.double() for v in stats.weights.values()]
        target = x @ w.T
        log_s = torch.zeros(stats.width, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([log_s], lr=0.05)
        spec = replace(settings.act_spec() or fake_spec(), clip_ratio=1.0)

        def loss_fn():
            s = log_s.exp()
            return (fake_quantize(x / s, spec) @ (w * s).T - target).pow(2).mean()

        first = float(loss_fn().detach())
        for _ in range(30):
            optimizer.zero_grad()
            loss = loss_fn()
            loss.backward()
            optimizer.step()
        self.losses.append((first, float(loss_fn().detach())))
        learned = Scale((-log_s.detach()).exp())  # x·diag(1/s)
        return {"mlp_down": replace(layer.plans["mlp_down"], transform=learned)}


def fake_spec():
    from quantcompose.quant import QuantSpec

    return QuantSpec(4, False, "token")


class _Plugin:
    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    @hookimpl
    def quantcompose_strategies(self):
        yield self.strategy


def _manager(strategy: Strategy) -> StrategyManager:
    manager = StrategyManager(load_entry_points=False)
    manager.register(_Plugin(strategy))
    return manager


def _layer_outputs(model, tokens) -> list[torch.Tensor]:
    outputs = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(tokens, use_cache=False)
    for h in handles:
        h.remove()
    return outputs


def test_layer_scope_gets_full_precision_outputs_and_its_plans_are_exact_at_16_bits():
    reference = tiny_llama().double()
    model = tiny_llama().double()
    calib = torch.randint(0, 128, (3, 16))
    expected_outputs = _layer_outputs(reference, calib)
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        before = model(tokens).logits
    strategy = LearnedDownScale()
    # 16-bit run: the learned transform is still folded in, so the model must be unchanged.
    quantize_model(model, calib, strategy.name, QuantSettings(wbits=16, abits=16, storage_dtype="float32"), manager=_manager(strategy),
                   progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=1e-9, atol=1e-9)
    assert [ctx.index for ctx in strategy.seen] == [0, 1]
    for ctx, expected in zip(strategy.seen, expected_outputs):
        assert len(ctx.fp_outputs) == 1 and len(ctx.inputs) == 1
        torch.testing.assert_close(ctx.fp_outputs[0], expected, rtol=1e-9, atol=1e-9)
        assert set(ctx.plans) == {"attn_in", "attn_out", "mlp_in", "mlp_down"}
        assert ctx.model is not None and ctx.model.hidden_size == 96


def test_layer_scope_training_lowers_its_loss_and_the_result_is_used():
    model = tiny_llama()
    with torch.no_grad():  # an outlier channel at down_proj's input (exact: up row ×50, down column ÷50)
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[3] *= 50.0
            layer.mlp.down_proj.weight[:, 3] /= 50.0
    strategy = LearnedDownScale()
    report = quantize_model(model, torch.randint(0, 128, (3, 16)), strategy.name, QuantSettings(wbits=8, abits=4),
                            manager=_manager(strategy), progress=False)
    assert all(after < before for before, after in strategy.losses), strategy.losses
    down = [p for p in report.places if p["place"] == "mlp_down"]
    assert all(p["transform"] == "Scale" and p["folded"] == "Scale" for p in down)
    assert LearnedDownScale.scopes() == ("layer",)


class AttentionWatcher(LearnedDownScale):
    """Records, while it fits, whether Q/K/V quantization is on and what the layer then computes."""

    name = "test-attention-watcher"

    def __init__(self) -> None:
        super().__init__()
        self.observed: list[tuple[bool, float, float]] = []

    def fit_layer(self, layer, options, settings):
        from quantcompose.attention_quant import attention_quantizer_of, set_attention_quantizer

        attention = layer.layer.self_attn
        quantizer = attention_quantizer_of(attention)
        hidden, kwargs = layer.inputs[0]
        with torch.no_grad():
            on = layer.layer(hidden, **kwargs)
            on = on[0] if isinstance(on, tuple) else on
            set_attention_quantizer(attention, None)
            off = layer.layer(hidden, **kwargs)
            off = off[0] if isinstance(off, tuple) else off
            set_attention_quantizer(attention, quantizer)
        target = layer.fp_outputs[0]
        self.observed.append((quantizer is not None, float((on - target).abs().max()), float((off - target).abs().max())))
        return super().fit_layer(layer, options, settings)


def test_layer_scope_trains_with_qkv_quantization_on_against_float_outputs():
    strategy = AttentionWatcher()
    quantize_model(tiny_llama(), torch.randint(0, 128, (2, 16)), strategy.name,
                   QuantSettings(wbits=16, abits=16, qkv_bits=4, storage_dtype="float32"),
                   manager=_manager(strategy), progress=False)
    assert len(strategy.observed) == 2
    for quantized, error_on, error_off in strategy.observed:
        assert quantized  # the layer trains as it will run: Q/K/V quantized
        assert error_on > 1e-3  # ... which is not what the full-precision targets were computed with
        assert error_off < 1e-5


def test_layer_scope_refuses_true_sequential():
    strategy = LearnedDownScale()
    with pytest.raises(CalibrationError, match="true-sequential"):
        quantize_model(tiny_llama(), torch.randint(0, 128, (2, 8)), strategy.name,
                       QuantSettings(true_sequential=True), manager=_manager(strategy), progress=False)
