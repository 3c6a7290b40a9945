"""A decoder layer run with fake-quantized, learnable quantizers, leaving the layer itself untouched.

How: a float32 *copy* of the layer, its parameters frozen, run through
``torch.func.functional_call`` with each place's linear weights replaced by
their fake-quantized form, and forward pre-hooks (on the copy) that apply the
place's transform and activation fake quantizer to the linears' input.

Why this shape: the copy runs the architecture's own code (attention
implementation, RoPE, norms), so nothing is re-implemented per model; the
weights are swapped per call rather than written, so autograd links the loss
to the clip parameters through the quantizer and no in-place edit can leak;
and the hooks live on the copy, so the caller's layer (``LayerContext.layer``,
which the pipeline quantizes afterwards) keeps neither hooks nor a changed
dtype. The copy costs one layer's weights, the same order as the layer's
calibration activations already held.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from quantcompose.errors import ShapeError
from quantcompose.learning.fake_quant import LearnableActClip, LearnableWeightClip
from quantcompose.learning.let import LearnableScale
from quantcompose.models import get_submodule
from quantcompose.strategy import Plan
from quantcompose.transforms import Identity, Transform
from quantcompose.transforms.learnable import LearnableKronecker


@dataclass
class PlaceQuantizers:
    """The learnable quantizers of one input place (``None``: that side stays in float).

    With a learnable ``scale`` it replaces ``transform`` (its starting value).
    A learnable ``kronecker`` runs after it (FlatQuant): the input is
    ``x·T·(A ⊗ B)`` and the weights ``W·T⁻ᵀ·(A ⊗ B)⁻ᵀ``.
    """

    linears: tuple[str, ...]
    transform: Transform
    weight: LearnableWeightClip | None
    act: LearnableActClip | None
    scale: LearnableScale | None = None
    kronecker: LearnableKronecker | None = None


def place_quantizers(
    layer: nn.Module, place: Any, plan: Plan, init_logit: float, learn_scale: bool = False,
    kronecker: LearnableKronecker | None = None,
) -> PlaceQuantizers:
    """Learnable quantizers for ``place`` following ``plan``'s specs (clip ratios start at ``sigmoid(init_logit)``).

    ``learn_scale`` trains the plan's transform too, which must then be a ``Scale``;
    ``kronecker`` (of the place's width) is trained after it.
    """
    rows = sum(get_submodule(layer, name).weight.shape[0] for name in place.linears)
    weight = None
    if plan.weight_spec is not None:
        weight = LearnableWeightClip(rows, plan.transform.size, plan.weight_spec, init_logit)
    act = None if plan.act_spec is None else LearnableActClip(plan.act_spec, init_logit)
    scale = LearnableScale(plan.transform) if learn_scale else None
    if kronecker is not None and kronecker.width != plan.transform.size:
        raise ShapeError(
            f"place {place.name!r} has width {plan.transform.size} but its learnable Kronecker has "
            f"width {kronecker.width}; build it with factors m·n = {plan.transform.size}."
        )
    return PlaceQuantizers(tuple(place.linears), plan.transform, weight, act, scale, kronecker)


class FakeQuantLayer(nn.Module):
    """``layer`` computing ``Q_a(x·T)·Q_w(W·T⁻ᵀ)ᵀ`` at every place, differentiable in the clip parameters."""

    def __init__(self, layer: nn.Module, quantizers: dict[str, PlaceQuantizers]) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer).float()
        self.layer.requires_grad_(False)
        self.weight_clips = nn.ModuleDict({k: q.weight for k, q in quantizers.items() if q.weight is not None})
        self.act_clips = nn.ModuleDict({k: q.act for k, q in quantizers.items() if q.act is not None})
        self.scales = nn.ModuleDict({k: q.scale for k, q in quantizers.items() if q.scale is not None})
        self.kroneckers = nn.ModuleDict({k: q.kronecker for k, q in quantizers.items() if q.kronecker is not None})
        self.places = quantizers
        # W·T⁻ᵀ of each place, stacked over its sibling linears: fixed during training.
        self._folded: dict[str, torch.Tensor] = {}
        self._rows: dict[str, list[int]] = {}
        for name, q in quantizers.items():
            weights = [get_submodule(self.layer, lin).weight.detach() for lin in q.linears]
            self._rows[name] = [w.shape[0] for w in weights]
            stacked = torch.cat(weights)
            if q.scale is None and not isinstance(q.transform, Identity):
                stacked = q.transform.fold_into_weight(stacked.double())[0].float()
            self._folded[name] = stacked
        self._handles = [
            get_submodule(self.layer, lin).register_forward_pre_hook(self._input_hook(name))
            for name, q in quantizers.items()
            for lin in q.linears
        ]

    def _input_hook(self, place: str):
        q = self.places[place]

        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if q.scale is not None:
                x = q.scale.on_input(x)
            elif not isinstance(q.transform, Identity):
                x = q.transform(x)
            if q.kronecker is not None:
                x = q.kronecker(x)
            if place in self.act_clips:
                x = self.act_clips[place](x)
            return (x, *args[1:])

        return hook

    def replaced_weights(self) -> dict[str, torch.Tensor]:
        """Parameter name → fake-quantized (or folded float) weight, for ``functional_call``."""
        replaced: dict[str, torch.Tensor] = {}
        for name, q in self.places.items():
            stacked = self._folded[name]
            if q.scale is not None:
                stacked = q.scale.on_weight(stacked)
            if q.kronecker is not None:
                stacked = q.kronecker.fold_into_weight(stacked)
            if name in self.weight_clips:
                stacked = self.weight_clips[name](stacked)
            for lin, w in zip(q.linears, stacked.split(self._rows[name])):
                replaced[f"{lin}.weight"] = w
        return replaced

    def forward(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = functional_call(self.layer, self.replaced_weights(), (hidden.float(),), _float_kwargs(kwargs))
        return out[0] if isinstance(out, (tuple, list)) else out

    def close(self) -> None:
        """Remove the hooks from the copy (the copy is dropped with this object anyway)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _float_kwargs(value: Any) -> Any:
    """Floating tensors in the layer's keyword arguments (RoPE tables, masks) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _float_kwargs(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_float_kwargs(v) for v in value)
    return value


__all__ = ["FakeQuantLayer", "PlaceQuantizers", "place_quantizers"]
