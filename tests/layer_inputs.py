"""Helpers for tests of the layer scope: what a float layer receives and returns, fixed plans, a one-strategy manager."""

from __future__ import annotations

import copy
from typing import Any

import torch

from quantcompose.hookspecs import hookimpl
from quantcompose.models import get_adapter
from quantcompose.pipeline import LayerJob, capture_first_layer_inputs, quantize_layer
from quantcompose.plugin_manager import StrategyManager
from quantcompose.quant.weight_quantizers import get_weight_quantizer
from quantcompose.strategy import LayerContext, Plan, QuantSettings, Strategy


def layer_output(result: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's result (transformers returns a tensor or a tuple)."""
    return result[0] if isinstance(result, (tuple, list)) else result


def float_layer_inputs(model, tokens: torch.Tensor, index: int, batch_size: int = 4) -> list[tuple[torch.Tensor, dict]]:
    """The (hidden, kwargs) batches layer ``index`` sees: ``tokens`` run through the float layers before it.

    Read-only use of ``model`` (no grad, nothing changed), so a shared session model may be passed.
    """
    layers = get_adapter(model).layers()
    with torch.no_grad():
        inputs = capture_first_layer_inputs(model, layers, tokens, batch_size=batch_size)
        for layer in layers[:index]:
            inputs = [(layer_output(layer(h, **kw)), kw) for h, kw in inputs]
    return inputs


class FixedPlans(Strategy):
    """A place-scope strategy handing out given plans (to quantize frozen, learned plans alone)."""

    name = "test-fixed-plans"
    description = "given plans"

    def __init__(self, plans: dict[str, Plan]) -> None:
        self.plans = plans

    def plan(self, stats, options, settings):
        return self.plans[stats.place]


def held_out_error(full: LayerContext, plans: dict[str, Plan], train: int, held_out: int,
                   settings: QuantSettings) -> float:
    """MSE against the float output on ``full.inputs[held_out]`` of a copy of ``full.layer`` quantized with
    ``plans`` (round-to-nearest weights, calibrated on ``full.inputs[train]``)."""
    layer = copy.deepcopy(full.layer)
    job = LayerJob(layer=layer, index=full.index, places=full.places, inputs=[full.inputs[train]],
                   strategy=FixedPlans(plans), options={}, settings=settings,
                   weight_quantizer=get_weight_quantizer("rtn"), generator=torch.Generator().manual_seed(0))
    quantize_layer(job)
    hidden, kwargs = full.inputs[held_out]
    with torch.no_grad():
        return float((layer_output(layer(hidden, **kwargs)) - full.fp_outputs[held_out]).pow(2).mean())


def manager_of(strategy: Strategy) -> StrategyManager:
    """A plugin manager holding only ``strategy`` (no entry points), for a test's own strategy."""

    class _Plugin:
        @hookimpl
        def quantcompose_strategies(self):
            yield strategy

    manager = StrategyManager(load_entry_points=False)
    manager.register(_Plugin())
    return manager
