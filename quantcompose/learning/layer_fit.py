"""Train a layer's learnable quantizers and freeze them into plans: what layer-scope strategies share.

A strategy (OmniQuant, FlatQuant) builds the :class:`PlaceQuantizers` of each
place, names a learning rate per kind of parameter, and says how a place's
trained transform freezes; :func:`fit_and_freeze` trains them against the
layer's full-precision output and returns the plans with the learned clips
fixed (per-row weight bounds, the activation clip ratio) and both clip
searches off, so nothing downstream searches over the learned ranges again.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from quantcompose.options import Option, in_range, integer_at_least
from quantcompose.learning.fake_layer import FakeQuantLayer, PlaceQuantizers
from quantcompose.learning.trainer import TrainOptions, train_layer
from quantcompose.strategy import LayerContext, Plan, QuantSettings
from quantcompose.transforms import Transform

#: The kinds of learnable parameter a :class:`FakeQuantLayer` holds (its ``ModuleDict`` attributes).
PARAMETER_KINDS = ("weight_clips", "act_clips", "scales", "kroneckers")

#: ``(place name, its quantizers, its plan) -> the plan's frozen transform``.
FreezeFn = Callable[[str, PlaceQuantizers, Plan], Transform]


def trainer_options(epochs: int, samples: int, paper_epochs: int, paper_samples: str) -> dict[str, Option]:
    """The options :func:`train_options` reads, with a strategy's defaults and its paper's settings in the help."""
    return {
        "epochs": Option(epochs, f"training epochs per layer over the calibration set (paper: {paper_epochs})",
                         check=integer_at_least(1)),
        "samples": Option(samples, "calibration sequences trained on, the first ones; 0: all "
                          f"(paper: {paper_samples})", check=integer_at_least(0)),
        "batch_size": Option(1, "calibration sequences per training step", check=integer_at_least(1)),
        "weight_decay": Option(0.0, "AdamW weight decay", check=in_range(0.0, None)),
    }


def train_options(options: dict[str, Any], settings: QuantSettings, layer: LayerContext, description: str) -> TrainOptions:
    """The trainer's options from a strategy's ``epochs``, ``batch_size``, ``samples`` (0: all) and ``weight_decay``."""
    return TrainOptions(
        epochs=int(options["epochs"]),
        batch_size=int(options["batch_size"]),
        max_samples=int(options["samples"]) or None,
        weight_decay=float(options["weight_decay"]),
        seed=settings.seed,
        progress=layer.progress,
        description=description,
    )


def fit_and_freeze(
    layer: LayerContext,
    quantizers: dict[str, PlaceQuantizers],
    rates: dict[str, float],
    train: TrainOptions,
    freeze: FreezeFn,
) -> dict[str, Plan]:
    """Train ``quantizers`` (AdamW, ``rates[kind]`` per parameter kind) and return the frozen plans by place.

    Every kind present in the fake layer needs a rate (a missing one is a
    ``KeyError`` naming it, so a parameter is never left untrained unnoticed).
    """
    fake = FakeQuantLayer(layer.layer, quantizers)
    groups = []
    for kind in PARAMETER_KINDS:
        modules = getattr(fake, kind)
        if len(modules):
            if kind not in rates:
                raise KeyError(f"no learning rate for the {kind} of layer {layer.index}")
            groups.append({"params": list(modules.parameters()), "lr": float(rates[kind])})
    try:
        report = train_layer(layer, groups, fake, train)
    finally:
        fake.close()
    notes = {"clip": "learned", "loss_epoch1": round(report.epoch_losses[0], 6),
             "loss_final": round(report.epoch_losses[-1], 6)}
    refined: dict[str, Plan] = {}
    for name, q in quantizers.items():
        plan = layer.plans[name]
        refined[name] = replace(
            plan,
            transform=freeze(name, q, plan),
            act_spec=None if q.act is None else replace(plan.act_spec, clip_ratio=q.act.frozen_ratio()),
            weight_spec=None if q.weight is None else replace(plan.weight_spec, clip_ratio=1.0),
            weight_clip_rows=None if q.weight is None else q.weight.frozen_bounds(),
            search_act_clip=False,
            search_weight_clip=False,
            notes={**plan.notes, **notes},
        )
    return refined


__all__ = ["FreezeFn", "PARAMETER_KINDS", "fit_and_freeze", "train_options", "trainer_options"]
