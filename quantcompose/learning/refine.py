"""Learned refinement of any place-scope strategy's plans: ``QuantSettings.refine = "lwc"``.

The DuQuant paper's "DuQuant + LWC" row, for every closed-form method: once
a layer's place plans are chosen (DuQuant's rotations, SmoothQuant's or
QuaRot's transforms, or none for RTN), OmniQuant's learnable weight clipping
(per output row, and group, a sigmoid-parametrized lower and upper clip ratio
on the weight *in the transformed basis*, ``W·T⁻ᵀ``) and one learnable clip
ratio per place for the per-token activation quantizer are trained against
the layer's full-precision output (:mod:`quantcompose.learning.trainer`);
the transforms stay as the strategy chose them.

**One owner per clip.** The clip searches (``weight_clip_search``,
``act_clip_search``) and the strategy's fixed ratios decide where training
*starts* (:func:`closed_form_plan`: exactly the clips the pipeline would
otherwise use, a ratio of 1 started at ``sigmoid(4) ≈ 0.98`` where the
sigmoid still has a slope); the learned ratios are then frozen into the
plan (``weight_clip_rows``, the activation spec's ``clip_ratio``) with both
searches off, so they *replace* the searches' results rather than being
searched over again. The weight quantizer then quantizes inside the learned
ranges: round-to-nearest reproduces the training's grid exactly, GPTQ
rounds with error compensation inside it. The result is an ordinary
quantized layer; saving, loading and folding do not know it was learned.

**What the layer trains on**: what the layer scope is given
(:mod:`quantcompose.learning.trainer`): the outputs of the already quantized
layers before it as inputs, and the full-precision layer run on those same
inputs as the target. So each layer learns to reproduce itself on the inputs
it will see at inference, not to undo its predecessors' error
(docs/benchmarks.md has the measurement).

Q/K/V quantization after RoPE (``qkv_bits``) is on during training, the
gradient passing straight through its rounding, as at inference. Not
simulated: the storage dtype's rounding of online transforms. Not learned: the strategy's
transforms themselves (their smoothing scale included). Not refined: the LM
head, which has no layer output to match.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from quantcompose.errors import OptionError
from quantcompose.learning.fake_layer import FakeQuantLayer, PlaceQuantizers, place_quantizers
from quantcompose.learning.fake_quant import INIT_LOGIT
from quantcompose.learning.trainer import TrainOptions, TrainReport, train_layer
from quantcompose.quant import row_clip_ratios, searched_act_spec
from quantcompose.strategy import LayerContext, Plan, QuantSettings, Strategy


def check_refine(strategy: Strategy, settings: QuantSettings) -> None:
    """Raise :class:`OptionError` for a refinement these settings and this strategy cannot run; before calibration."""
    if settings.refine is None:
        return
    if "layer" in strategy.scopes():
        raise OptionError(
            f"refine={settings.refine!r} refines a place-scope strategy's closed-form plans, but "
            f"{strategy.name!r} fits whole layers itself (layer scope), which would train twice; "
            "drop refine (--refine), or use a place-scope method (duquant, quarot, smoothquant, rtn)."
        )
    if settings.wbits >= 16:
        raise OptionError(
            f"refine={settings.refine!r} learns weight clipping, but wbits={settings.wbits} leaves the weights "
            "in floating point (nothing to clip); drop refine or quantize the weights."
        )
    if settings.true_sequential:
        raise OptionError(
            f"refine={settings.refine!r} trains each layer as a whole against its output, which true-sequential "
            "calibration would split; turn true_sequential (--true-sequential) off."
        )


def uniform_bounds(ratios: torch.Tensor, groups: int) -> torch.Tensor:
    """``(rows,)`` symmetric clip ratios as ``(rows, groups, 2)`` (lower, upper) bounds, the same for every group."""
    return ratios.detach().float().reshape(-1, 1, 1).expand(-1, groups, 2).clone()


def closed_form_plan(ctx: LayerContext, place: Any, plan: Plan) -> Plan:
    """``plan`` with its clip searches carried out: the clips the pipeline would quantize ``place`` with.

    The weight ratios become fixed ``weight_clip_rows`` and the activation
    ratio the spec's ``clip_ratio``; both searches are then off.
    """
    stats = ctx.stats[place.name]
    weight, act = plan.weight_spec, plan.act_spec
    search_act = act is not None and plan.search_act_clip
    search_weight = weight is not None and plan.search_weight_clip and plan.weight_clip_rows is None
    stacked = plan.transform.fold_into_weight(torch.cat([stats.weights[n] for n in place.linears]).double())[0]
    seen = plan.transform(stats.act_sample.float()) if search_act or search_weight else None
    if search_act:
        act = searched_act_spec(act, seen, stacked)
    rows = plan.weight_clip_rows
    if weight is not None and rows is None:
        groups = 1 if weight.granularity != "group" else stacked.shape[1] // weight.group_size
        rows = uniform_bounds(row_clip_ratios(stacked, weight, seen if search_weight else None), groups)
        weight = replace(weight, clip_ratio=1.0)
    return replace(plan, act_spec=act, weight_spec=weight, weight_clip_rows=rows,
                   search_act_clip=False, search_weight_clip=False)


def learnable_quantizers(ctx: LayerContext, plans: dict[str, Plan], cap: float = INIT_LOGIT) -> dict[str, PlaceQuantizers]:
    """Learnable clips of every place of ``ctx``, started at the fixed clips of ``plans`` (no searches left)."""
    quantizers: dict[str, PlaceQuantizers] = {}
    for place in ctx.places:
        plan = plans[place.name]
        q = place_quantizers(ctx.layer, place, plan, INIT_LOGIT)
        if q.weight is not None:
            q.weight.start_at(plan.weight_clip_rows, cap)
        if q.act is not None:
            q.act.start_at(plan.act_spec.clip_ratio, cap)
        quantizers[place.name] = q
    return quantizers


def frozen_plan(plan: Plan, q: PlaceQuantizers, report: TrainReport, method: str) -> Plan:
    """``plan`` with the learned clips of ``q`` frozen in, and the training's losses in its notes."""
    notes = {"clip": f"learned ({method})", "loss_epoch1": round(report.epoch_losses[0], 6),
             "loss_final": round(report.epoch_losses[-1], 6)}
    return replace(
        plan,
        act_spec=None if q.act is None else replace(plan.act_spec, clip_ratio=q.act.frozen_ratio()),
        weight_clip_rows=None if q.weight is None else q.weight.frozen_bounds(),
        notes={**plan.notes, **notes},
    )


def refine_layer(ctx: LayerContext, settings: QuantSettings) -> tuple[dict[str, Plan], TrainReport | None]:
    """The refined plans of every place of ``ctx`` and the training report (``None``: nothing was quantized).

    ``ctx.plans`` are the strategy's closed-form plans; ``settings`` gives the
    refinement's epochs, samples, learning rate and seed.
    """
    closed = {p.name: closed_form_plan(ctx, p, ctx.plans[p.name]) for p in ctx.places}
    quantizers = learnable_quantizers(ctx, closed)
    fake = FakeQuantLayer(ctx.layer, quantizers)
    try:
        params = [*fake.weight_clips.parameters(), *fake.act_clips.parameters()]
        if not params:  # every place of this layer left in float (a recipe's targets)
            return closed, None
        train = TrainOptions(
            epochs=settings.refine_epochs,
            max_samples=settings.refine_samples or None,
            seed=settings.seed,
            progress=ctx.progress,
            description=f"refine {settings.refine}",
        )
        report = train_layer(ctx, [{"params": params, "lr": float(settings.refine_lr)}], fake, train)
    finally:
        fake.close()
    refined = {name: frozen_plan(closed[name], q, report, str(settings.refine)) for name, q in quantizers.items()}
    return refined, report


__all__ = ["check_refine", "closed_form_plan", "frozen_plan", "learnable_quantizers", "refine_layer", "uniform_bounds"]
