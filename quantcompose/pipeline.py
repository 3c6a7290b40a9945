"""Layer-by-layer calibration and quantization.

For each decoder layer in turn: collect activation statistics at each input
place, ask the strategy for a plan, fold what the module before the place
can absorb, install the rest online in :class:`QuantLinear`, quantize the
weights, and run the quantized layer to produce the next layer's inputs.
Only one layer's calibration activations live in memory at a time.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from quantcompose.attention_quant import AttentionQuantizer, install_attention_quantization, set_attention_quantizer
from quantcompose.errors import CalibrationError, QuantSpecError
from quantcompose.learning.fake_quant import clamp_to_bounds
from quantcompose.learning.refine import check_refine, refine_layer
from quantcompose.model_scope import apply_model_plan, model_facts, residual_hadamard_plan
from quantcompose.models import InputPlace, ModelAdapter, get_adapter, get_submodule, set_submodule
from quantcompose.plugin_manager import StrategyManager, check_plan, get_plugin_manager
from quantcompose.qlinear import QuantLinear, SharedInput
from quantcompose.quant_embedding import quantize_embedding, tied_head_message
from quantcompose.quant import QuantSpec, clamp_to_ratios, fake_quantize, row_clip_ratios, searched_act_spec
from quantcompose.quant.weight_quantizers import WeightQuantizer, get_weight_quantizer
from quantcompose.storage import hold_in_storage, round_float_weights, storage_dtype, stored_transform
from quantcompose.targets import PlaceTargets
from quantcompose.strategy import LayerContext, ModelFacts, ModelPlan, PlaceStats, Plan, QuantSettings, Strategy
from quantcompose.threads import limited_threads
from quantcompose.transforms import Compose, Identity, Scale, Transform


@dataclass
class QuantizationReport:
    """What the pipeline did: time spent and one line per (layer, place)."""

    method: str
    settings: QuantSettings
    options: dict[str, Any]
    seconds: float = 0.0
    places: list[dict[str, Any]] = field(default_factory=list)
    model_plan: dict[str, Any] | None = None  # what the model scope rewrote, if anything
    attention: str | None = None  # how Q/K/V are quantized, if they are
    embedding: str | None = None  # the embedding table's quantizer, if it is quantized


class _StopForward(Exception):
    """Raised by the capture hook once the first layer's inputs are recorded."""


class _ActivationStats:
    """Running per-channel max |x| and a random subsample of rows for one place."""

    def __init__(
        self, total_rows: int, sample_rows: int, generator: torch.Generator, second_moment: bool = False
    ) -> None:
        self.keep_fraction = min(1.0, sample_rows / max(total_rows, 1))
        self.generator = generator
        self.absmax: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        # XᵀX over *all* calibration rows (GPTQ's Hessian): a subsample of a
        # few thousand rows under-determines it for the 1536-wide down_proj.
        self.second_moment = second_moment
        self.xtx: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1]).float()
        current = flat.abs().amax(dim=0)
        self.absmax = current if self.absmax is None else torch.maximum(self.absmax, current)
        keep = max(1, round(flat.shape[0] * self.keep_fraction))
        index = torch.randperm(flat.shape[0], generator=self.generator)[:keep].to(flat.device)
        self.rows.append(flat.index_select(0, index).cpu())
        self.count += flat.shape[0]
        if self.second_moment:
            # float32 accumulation is ample for the few thousand rows of a calibration set.
            if self.xtx is None:
                self.xtx = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
            self.xtx.addmm_(flat.T, flat)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _check_finite(tensor: torch.Tensor, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise CalibrationError(
            f"NaN or infinite values in {where}. Check the calibration data (token ids in range, "
            "no NaN in embeddings), and run calibration in float32 rather than float16."
        )


def capture_first_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Run the embeddings on the calibration tokens and record what layer 0 receives."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("hidden_states", None)
        captured.append((hidden.detach(), kwargs))
        raise _StopForward

    device = next(model.parameters()).device
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk in tokens.split(batch_size):
            try:
                model(chunk.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def split_absorbable(transform: Transform, place: InputPlace) -> tuple[Transform | None, Transform | None]:
    """Split ``T`` into (part folded into the module before ``place``, part run online), ``T = A·R``.

    A diagonal place absorbs a leading :class:`Scale`; a shared-diagonal one
    (``o_proj`` under grouped-query attention) only a scale whose factors
    repeat across the query heads of each value head. Anything else runs online.
    """
    if place.absorbable == "any":
        return transform, None
    if place.absorbable in ("diagonal", "shared_diagonal"):
        parts = list(transform.transforms) if isinstance(transform, Compose) else [transform]
        head, rest = parts[0], parts[1:]
        if isinstance(head, Scale) and place.prev_factors(head.factors) is not None:
            return head, (None if not rest else rest[0] if len(rest) == 1 else Compose(rest))
    if isinstance(transform, Identity):
        return None, None
    return None, transform


def _fold_into_previous(layer: nn.Module, place: InputPlace, absorbed: Transform) -> None:
    prev = get_submodule(layer, place.prev)
    with torch.no_grad():
        if place.prev_kind == "norm":
            if not isinstance(absorbed, Scale):
                raise TypeError(f"a norm can only absorb a diagonal Scale, got {type(absorbed).__name__}")
            prev.weight.mul_(absorbed.factors.to(prev.weight.device, prev.weight.dtype))
        elif place.prev_kind == "linear":
            if place.absorbable == "shared_diagonal":
                # one value row per group of query heads: the group's (equal) factors
                absorbed = Scale(place.prev_factors(absorbed.factors))
            # A fused producer (Phi-3's gate_up_proj) absorbs into the rows that are this activation.
            start, stop = place.prev_rows if place.prev_rows is not None else (0, prev.weight.shape[0])
            bias = None if prev.bias is None else prev.bias.data[start:stop]
            weight, bias = absorbed.fold_into_output(prev.weight.data[start:stop], bias)
            prev.weight.data[start:stop].copy_(weight)
            if prev.bias is not None:
                prev.bias.data[start:stop].copy_(bias)
        else:
            raise ValueError(f"place {place.name!r} has nothing before it that can absorb a transform")


def _describe(plan: Plan, online: Transform | None, absorbed: Transform | None) -> dict[str, Any]:
    def name(t: Transform | None) -> str:
        if t is None:
            return "-"
        if isinstance(t, Compose):
            return "·".join(type(a).__name__ for a in t.transforms)
        return type(t).__name__

    return {
        "transform": name(plan.transform),
        "folded": name(absorbed),
        "online": name(online),
        "act": str(plan.act_spec) if plan.act_spec else "float",
        "weight": str(plan.weight_spec) if plan.weight_spec else "float",
        **plan.notes,
    }


@dataclass
class LayerJob:
    """Everything the pipeline needs to quantize one decoder layer, as one value."""

    layer: nn.Module
    index: int
    places: list[InputPlace]
    inputs: list[tuple[torch.Tensor, dict[str, Any]]]
    strategy: Strategy
    options: dict[str, Any]
    settings: QuantSettings
    weight_quantizer: WeightQuantizer
    generator: torch.Generator
    sample_rows: int = 2048
    workers: int = 1
    facts: ModelFacts | None = None
    #: Q/K/V quantization of this layer's attention, switched on once its attention is quantized.
    attention_quantizer: AttentionQuantizer | None = None
    attention: nn.Module | None = None
    progress: bool = True
    #: Settings of single places that differ from ``settings`` (a recipe's targets), by place name.
    place_settings: dict[str, QuantSettings] = field(default_factory=dict)

    def settings_of(self, place: str) -> QuantSettings:
        return self.place_settings.get(place, self.settings)


def quantize_layer(job: LayerJob) -> list[dict[str, Any]]:
    """Calibrate, plan, fold and quantize one decoder layer in place.

    ``job.workers`` threads fit the places' plans and quantize their weights
    side by side (the strategy's ``plan`` may then run concurrently for
    different places; results do not depend on ``workers``).
    """
    layer_scope = "layer" in job.strategy.scopes()
    if job.settings.true_sequential and layer_scope:
        raise CalibrationError(
            f"strategy {job.strategy.name!r} fits whole layers (layer scope), which true-sequential "
            "calibration would split; turn true_sequential (--true-sequential) off."
        )
    if layer_scope and len({job.settings_of(p.name) for p in job.places}) > 1:
        raise CalibrationError(
            f"strategy {job.strategy.name!r} fits whole layers (layer scope) with one set of settings, but the "
            f"recipe's targets give the places of layer {job.index} different bits; target whole layers instead."
        )
    groups = sequential_groups(job.places) if job.settings.true_sequential else [list(job.places)]
    summary: list[dict[str, Any]] = []
    for i, group in enumerate(groups):
        summary += _quantize_group(job, group, layer_scope, refine=job.settings.refine is not None,
                                   holds_attention=i == 0)
        if i == 0 and job.attention_quantizer is not None:
            # From here on the layer runs with quantized Q/K/V: a later group
            # (the MLP under true-sequential) and the next layer calibrate on that.
            set_attention_quantizer(job.attention, job.attention_quantizer)
    return summary


def sequential_groups(places: list[InputPlace]) -> list[list[InputPlace]]:
    """The places split by the sub-block that holds their linears (attention, MLP), in order.

    Quantizing group by group lets each group calibrate on the activations the
    already quantized groups produce (GPTQ's "true sequential"). A group's
    transform may be folded into a linear of its own group only, which is not
    yet quantized when it is folded; if a place would fold into an earlier
    group, everything stays one group.
    """
    groups: list[list[InputPlace]] = []
    names: list[str] = []
    for place in places:
        if names and names[-1] == place.group:
            groups[-1].append(place)
        else:
            groups.append([place])
            names.append(place.group)
    for i, group in enumerate(groups):
        earlier = {name for g in groups[:i] for p in g for name in p.linears}
        if any(p.prev_kind == "linear" and p.prev in earlier for p in group):
            return [list(places)]
    return groups


def _raise_stop(module: nn.Module, args: tuple) -> None:
    raise _StopForward


def _collect_statistics(
    job: LayerJob, places: list[InputPlace], full_outputs: bool
) -> tuple[dict[str, _ActivationStats], list[torch.Tensor] | None]:
    """Run the layer on its calibration inputs with hooks on each place's first linear.

    Stops at the last place's input unless ``full_outputs`` asks for the
    layer's outputs (the layer scope's full-precision targets).
    """
    total_rows = sum(hidden.shape[0] * hidden.shape[1] for hidden, _ in job.inputs)
    second_moment = job.weight_quantizer.needs_hessian
    collectors = {
        p.name: _ActivationStats(total_rows, job.sample_rows, job.generator, second_moment) for p in places
    }
    handles = [
        get_submodule(job.layer, p.linears[0]).register_forward_pre_hook(collectors[p.name]) for p in places
    ]
    if not full_outputs:  # nothing after the last place's input is needed: stop the layer there
        handles.append(get_submodule(job.layer, places[-1].linears[0]).register_forward_pre_hook(_raise_stop))
    outputs: list[torch.Tensor] | None = [] if full_outputs else None
    try:
        with torch.no_grad():
            for hidden, kwargs in job.inputs:
                try:
                    result = job.layer(hidden, **kwargs)
                except _StopForward:
                    continue
                if outputs is not None:
                    outputs.append(_layer_output(result).detach())
    finally:
        for handle in handles:
            handle.remove()
    return collectors, outputs


def _quantize_group(
    job: LayerJob, places: list[InputPlace], layer_scope: bool, refine: bool = False, holds_attention: bool = False
) -> list[dict[str, Any]]:
    """Calibrate, plan, fold and quantize ``places`` (in execution order) of one layer.

    ``layer_scope``: the strategy refines the plans itself (``fit_layer``);
    ``refine``: the settings' learned refinement does (:mod:`quantcompose.learning.refine`).
    ``holds_attention``: these places include the attention's, so training runs
    with the layer's Q/K/V quantization on (after the full-precision outputs
    were taken), as the quantized layer will run.
    """
    collectors, fp_outputs = _collect_statistics(job, places, full_outputs=layer_scope or refine)
    all_stats: list[PlaceStats] = []
    for place in places:
        collector = collectors[place.name]
        if collector.absmax is None:
            raise CalibrationError(f"layer {job.index} place {place.name!r} saw no calibration activations")
        _check_finite(collector.absmax, f"the inputs of layer {job.index} at {place.name!r}")
        weights = {name: get_submodule(job.layer, name).weight.detach().float().cpu() for name in place.linears}
        all_stats.append(
            PlaceStats(
                layer_index=job.index,
                place=place.name,
                act_absmax=collector.absmax.cpu(),
                act_sample=collector.sample(),
                weights=weights,
                absorbable=place.absorbable,
                model=job.facts,
                shared_heads=place.shared_heads,
            )
        )

    def plan_one(stats: PlaceStats) -> Plan:
        plan = job.strategy.plan(stats, job.options, job.settings_of(stats.place))
        check_plan(job.strategy.name, plan, stats.place, stats.width)
        return plan

    fitted = _in_parallel(plan_one, all_stats, job.workers, cost=lambda st: st.width)
    if layer_scope or refine:
        context = LayerContext(
            index=job.index,
            layer=job.layer,
            places=list(places),
            inputs=job.inputs,
            fp_outputs=fp_outputs or [],
            stats={st.place: st for st in all_stats},
            plans={p.name: plan for p, plan in zip(places, fitted)},
            model=job.facts,
            progress=job.progress,
        )
        if holds_attention and job.attention_quantizer is not None:
            # Train against what inference does: fake_quantize passes the gradient straight through
            # Q, K and V, so the clips and transforms learn the cost of quantizing them.
            set_attention_quantizer(job.attention, job.attention_quantizer)
        with torch.enable_grad():  # the layer scope may train (the rest of the pipeline runs without grad)
            if layer_scope:
                refined = job.strategy.fit_layer(context, job.options, job.settings_of(places[0].name))
            else:
                refined = refine_layer(context, job.settings)[0]
        if refined is not None:
            unknown = sorted(set(refined) - {p.name for p in places})
            if unknown:
                raise ValueError(f"strategy {job.strategy.name!r} returned plans for unknown places {unknown}")
            fitted = [refined.get(p.name, plan) for p, plan in zip(places, fitted)]
            for st, plan in zip(all_stats, fitted):
                check_plan(job.strategy.name, plan, st.place, st.width)
    plans: list[tuple[InputPlace, Plan]] = list(zip(places, fitted))

    # Output-side folds (into norms, v_proj, up_proj) and input-side folds
    # (into the consuming linears) multiply the weight from opposite sides, so
    # they commute: do all of them on float weights before quantizing any.
    summary: list[dict[str, Any]] = []
    online_of: dict[str, Transform | None] = {}
    stored_dtype = storage_dtype(job.settings.storage_dtype)
    for i, (place, plan) in enumerate(plans):
        absorbed, online = split_absorbable(plan.transform, place)
        if absorbed is not None:
            _fold_into_previous(job.layer, place, absorbed)
        if online is not None:
            # The weights are folded with the inverse of the map that will really run online.
            stored = stored_transform(online, stored_dtype)
            if stored is not online:
                online = stored
                plans[i] = (place, replace(plan, transform=online if absorbed is None else Compose([absorbed, online])))
        online_of[place.name] = online
        summary.append({"layer": job.index, "place": place.name, **_describe(plan, online, absorbed)})

    samples = {st.place: st.act_sample for st in all_stats}

    def quantize_one(item: tuple[InputPlace, Plan]) -> QuantSpec | None:
        place, plan = item
        xtx = collectors[place.name].xtx
        if xtx is not None:
            xtx = xtx.double().cpu() / collectors[place.name].count
        return _quantize_place(job, place, plan, online_of[place.name], samples[place.name], xtx)

    # Each place replaces its own linears, so places can be quantized side by side;
    # GPTQ and the searches grow with the input width.
    quantized = _in_parallel(quantize_one, plans, job.workers, cost=lambda item: item[1].transform.size)
    for entry, act_spec in zip(summary, quantized):
        if act_spec is not None:
            entry["act"] = str(act_spec)
    return summary


def _in_parallel(fn: Callable[[Any], Any], items: list[Any], workers: int, cost: Callable[[Any], float]) -> list[Any]:
    """``[fn(x) for x in items]``, on ``workers`` threads of one torch thread each.

    Fitting a plan and quantizing a place are loops of small, sequential ops
    (greedy rotation steps, GPTQ columns) that cannot use a second core
    themselves, so the places of a layer share the cores instead. torch's
    thread count is process-wide, hence set once around the whole pool.
    Items are started in order of decreasing ``cost`` (the widest place, the
    1536-wide ``down_proj`` input, first) so that no core is left idle waiting
    for one long job started last.
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    order = sorted(range(len(items)), key=lambda i: -cost(items[i]))
    results: list[Any] = [None] * len(items)
    with limited_threads(1), ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        for i, result in zip(order, pool.map(fn, [items[i] for i in order])):
            results[i] = result
    return results


def _quantize_place(
    job: LayerJob,
    place: InputPlace,
    plan: Plan,
    online: Transform | None,
    sample: torch.Tensor,
    xtx: torch.Tensor | None,  # mean xᵀx over all calibration rows, for GPTQ
) -> QuantSpec | None:
    """Fold ``plan``'s transform into the place's linears and replace them by QuantLinears.

    Returns the activation quantizer used (its clip ratio searched when the
    plan says so).
    """
    layer = job.layer
    linears = [get_submodule(layer, name) for name in place.linears]
    folded = [
        plan.transform.fold_into_weight(lin.weight.data.double(), None if lin.bias is None else lin.bias.data)
        for lin in linears
    ]
    weights = [w for w, _ in folded]
    spec = plan.weight_spec
    act_spec = plan.act_spec
    search_act = act_spec is not None and plan.search_act_clip
    search_weight = spec is not None and plan.search_weight_clip
    if plan.weight_clip_rows is not None and plan.search_weight_clip:
        raise CalibrationError(
            f"layer {job.index} place {place.name!r}: the plan fixes per-row weight clips (weight_clip_rows) "
            "and also asks for the weight clip search; a strategy must choose one."
        )
    hessian_needed = spec is not None and xtx is not None
    # What the weights will see: the transformed calibration activations, read by
    # the activation clip search, the weight clip search and GPTQ's noise term.
    needs_seen = search_act or search_weight or (hessian_needed and act_spec is not None)
    seen = plan.transform(sample.float()) if needs_seen else None
    # Sibling linears share their input, so the searches and the weight quantizer see them stacked.
    stacked = torch.cat(weights)
    if search_act:
        act_spec = searched_act_spec(act_spec, seen, stacked)
    quantized: list[Any] = [None] * len(linears)
    if spec is not None:
        hessian = None
        if hessian_needed:
            # (XT)ᵀ(XT) = Tᵀ(XᵀX)T: transform the rows of the symmetric XᵀX, then the columns.
            hessian = plan.transform(plan.transform(xtx).T)
            if act_spec is not None:
                # The weights will meet quantized activations x̃ = xT + e, and
                # E[x̃ᵀx̃] = TᵀxᵀxT + E[eᵀe] (the cross terms are negligible):
                # the quantization noise acts as a data-driven damping.
                noise = fake_quantize(seen, act_spec) - seen
                hessian = hessian + (noise.T @ noise).double() / noise.shape[0]
        if plan.weight_clip_rows is not None:
            range_weight = clamp_to_bounds(stacked, plan.weight_clip_rows, spec)
        else:
            ratios = row_clip_ratios(stacked, spec, seen if search_weight else None)
            range_weight = clamp_to_ratios(stacked, ratios, spec)
        spec = replace(spec, clip_ratio=1.0)
        q = job.weight_quantizer.quantize(stacked, spec, range_weight=range_weight, hessian=hessian)
        # Each linear owns its pieces: views of one stacked storage cannot be saved (safetensors).
        rows = [w.shape[0] for w in weights]
        quantized = [
            replace(q, codes=c.clone(), scale=sc.clone(), zero_point=z.clone(), shape=torch.Size(c.shape))
            for c, sc, z in zip(q.codes.split(rows), q.scale.split(rows), q.zero_point.split(rows))
        ]
        weights = list(range_weight.split(rows))

    if online is not None:
        online.forget_derived()  # the fold's inverse is not needed again; the layers keep only `online`
    shared = SharedInput(readers=len(linears)) if len(linears) > 1 else None
    for name, linear, weight, (_, bias), q in zip(place.linears, linears, weights, folded, quantized):
        module = QuantLinear(
            weight.to(linear.weight.dtype),
            bias,
            transform=online,
            act_spec=act_spec,
            weight_spec=spec,
            quantized_weight=q,
        ).to(linear.weight.device)
        module.shared_input = shared
        set_submodule(layer, name, module)
    return act_spec


def prepare(
    model: nn.Module,
    method: str,
    settings: QuantSettings,
    options: dict[str, Any] | None,
    manager: StrategyManager,
) -> tuple[ModelAdapter, Strategy, dict[str, Any]]:
    """Everything that can be checked before any work: the adapter, the strategy, its options."""
    adapter = get_adapter(model)
    strategy = manager.get(method)
    resolved = strategy.resolve(options, settings)
    check_refine(strategy, settings)
    return adapter, strategy, resolved


def model_plan_for(
    strategy: Strategy, facts: ModelFacts, options: dict[str, Any], settings: QuantSettings
) -> ModelPlan | None:
    """The strategy's model-scope plan, with the settings' residual rotation composed in front."""
    plan = strategy.model_plan(facts, options, settings)
    if not settings.residual_rotation:
        return plan
    if plan is not None and plan.residual is not None:
        raise CalibrationError(
            f"strategy {strategy.name!r} rotates the residual stream itself; drop residual_rotation "
            "(--residual-rotation), which would rotate it a second time."
        )
    rotation = residual_hadamard_plan(facts, settings.seed)
    if plan is None:
        return rotation
    return replace(plan, fuse_norms=True, residual=rotation.residual)


def quantize_model(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    method: str = "duquant",
    settings: QuantSettings | None = None,
    options: dict[str, Any] | None = None,
    *,
    manager: StrategyManager | None = None,
    batch_size: int = 4,
    sample_rows: int = 2048,
    progress: bool = True,
    workers: int | None = None,
    targets: PlaceTargets | None = None,
) -> QuantizationReport:
    """Quantize ``model`` in place with the strategy ``method``.

    ``calib_tokens`` is a ``(nsamples, seqlen)`` tensor of token ids. With
    ``settings.wbits == settings.abits == 16`` nothing is quantized and only
    the transforms are applied: the model must then compute what it computed
    before, which is how the tests prove a method's transforms exact.

    The strategy acts at its scopes in order: the model-scope plan (and the
    settings' residual rotation) before calibration, then for each layer the
    place plans, refined by the layer scope when the strategy has one.
    ``workers`` (default: torch's intra-op thread count) is how many places of
    a layer are fitted and quantized at once, each on one thread.

    ``targets`` (from a recipe's targets and ignore, see
    :func:`quantcompose.targets.resolve_targets`) gives single places other
    settings, leaves places out (``nn.Linear`` as they were), and can quantize
    the LM head; without it every decoder-layer place gets ``settings`` and
    the head stays in float.
    """
    settings = settings or QuantSettings()
    manager = manager or get_plugin_manager()
    run = start_run(model, calib_tokens, method, settings, options, manager=manager, sample_rows=sample_rows,
                    progress=progress, workers=workers, targets=targets)
    layers = run.adapter.layers()
    with torch.no_grad():
        inputs = capture_first_layer_inputs(model, layers, calib_tokens, batch_size)
        for index in tqdm(range(len(layers)), desc=f"{method} layers", disable=not progress):
            inputs = quantize_layer_step(run, index, layers[index], inputs)
        finish_run(run, inputs)
    return run.report


@dataclass
class PipelineRun:
    """What every layer of one quantization run shares: the checked strategy, its settings, the RNG.

    Built by :func:`start_run`; :func:`quantize_layer_step` quantizes one
    layer with it and :func:`finish_run` ends the run. The in-memory
    pipeline (:func:`quantize_model`) and the offloaded one
    (:mod:`quantcompose.offload`) both drive these three, so a layer is
    quantized by one piece of code whichever holds the model.
    """

    adapter: ModelAdapter
    strategy: Strategy
    options: dict[str, Any]
    settings: QuantSettings
    weight_quantizer: WeightQuantizer
    generator: torch.Generator
    facts: ModelFacts
    plan: ModelPlan | None
    attention_quantizers: list[AttentionQuantizer | None]
    report: QuantizationReport
    targets: PlaceTargets | None = None
    sample_rows: int = 2048
    workers: int = 1
    progress: bool = True
    started: float = 0.0

    def job(self, index: int, layer: nn.Module, inputs: list, places: list[InputPlace], **changes: Any) -> LayerJob:
        """The :class:`LayerJob` of ``layer`` (``changes`` override its fields)."""
        fields: dict[str, Any] = dict(
            layer=layer, index=index, places=places, inputs=inputs, strategy=self.strategy, options=self.options,
            settings=self.settings, weight_quantizer=self.weight_quantizer, generator=self.generator,
            sample_rows=self.sample_rows, workers=self.workers, facts=self.facts, progress=self.progress,
        )
        fields.update(changes)
        return LayerJob(**fields)


def check_calibration_tokens(model: nn.Module, calib_tokens: torch.Tensor) -> None:
    """Raise :class:`CalibrationError` unless ``calib_tokens`` are ``(nsamples, seqlen)`` ids in the vocabulary."""
    if not isinstance(calib_tokens, torch.Tensor) or calib_tokens.ndim != 2 or calib_tokens.numel() == 0:
        shape = tuple(calib_tokens.shape) if isinstance(calib_tokens, torch.Tensor) else type(calib_tokens).__name__
        raise CalibrationError(f"calibration tokens must be a non-empty (nsamples, seqlen) tensor, got {shape}")
    if calib_tokens.is_floating_point() or calib_tokens.is_complex() or calib_tokens.dtype == torch.bool:
        raise CalibrationError(
            f"calibration tokens must be integer token ids, got dtype {calib_tokens.dtype}; "
            "tokenize the text (or use quantcompose.data.calibration_tokens)."
        )
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (calib_tokens.min() < 0 or calib_tokens.max() >= vocab):
        raise CalibrationError(f"calibration token ids must lie in [0, {vocab}); got ids outside that range")


def start_run(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    method: str,
    settings: QuantSettings,
    options: dict[str, Any] | None,
    *,
    manager: StrategyManager,
    sample_rows: int = 2048,
    progress: bool = True,
    workers: int | None = None,
    targets: PlaceTargets | None = None,
) -> PipelineRun:
    """Check everything, carry out the model-scope plan and prepare attention quantization.

    Touches only the embedding and LM head (rounded to the storage dtype)
    unless the strategy has a model-scope plan, which rewrites every layer.
    """
    adapter, strategy, resolved = prepare(model, method, settings, options, manager)
    check_calibration_tokens(model, calib_tokens)
    workers = torch.get_num_threads() if workers is None else max(1, int(workers))
    report = QuantizationReport(method, settings, resolved)
    started = time.perf_counter()
    facts = model_facts(adapter)
    plan = model_plan_for(strategy, facts, resolved, settings)
    check_embedding_setting(adapter, plan, settings, targets)
    if plan is not None:
        apply_model_plan(adapter, plan)
        report.model_plan = _describe_model_plan(plan)
    # After the model plan (which may rotate the embeddings), before calibration sees them.
    round_float_weights(adapter.embedding(), adapter.lm_head(), storage_dtype(settings.storage_dtype))
    layers = adapter.layers()
    attention_quantizers = [
        _attention_quantizer(settings if targets is None else targets.attention[index], plan)
        for index in range(len(layers))
    ]
    quantized_attention = [q for q in attention_quantizers if q is not None]
    if quantized_attention:
        # Switch the attention implementation now; each layer's quantizer goes on as it is quantized.
        install_attention_quantization(model, {}, layers=[adapter.attention(layer) for layer in layers])
        report.attention = quantized_attention[0].describe()
    return PipelineRun(
        adapter=adapter, strategy=strategy, options=resolved, settings=settings,
        weight_quantizer=get_weight_quantizer(settings.weight_quantizer),
        generator=torch.Generator().manual_seed(settings.seed), facts=facts, plan=plan,
        attention_quantizers=attention_quantizers, report=report, targets=targets, sample_rows=sample_rows,
        workers=workers, progress=progress, started=started,
    )


def quantize_layer_step(
    run: PipelineRun, index: int, layer: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]]
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Quantize decoder layer ``index`` in place on its calibration ``inputs``; returns the next layer's inputs.

    The layer's report lines are appended to ``run.report.places``.
    """
    for hidden, _ in inputs:
        _check_finite(hidden, f"the input of layer {index}")
    places = run.adapter.places(layer)
    place_settings: dict[str, QuantSettings] = {}
    if run.targets is not None:
        chosen = {p.name: run.targets.settings_for(index, p.name) for p in places}
        places = [p for p in places if chosen[p.name] is not None]
        place_settings = {name: s for name, s in chosen.items() if s is not None and s != run.settings}
    job = run.job(index, layer, inputs, places, attention_quantizer=run.attention_quantizers[index],
                  attention=run.adapter.attention(layer), place_settings=place_settings)
    if places:
        run.report.places += quantize_layer(job)
    elif job.attention_quantizer is not None:
        set_attention_quantizer(job.attention, job.attention_quantizer)
    return run_layer(layer, inputs)


def run_layer(
    layer: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]]
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """``layer``'s outputs on ``inputs``, paired with the same keyword arguments: the next layer's inputs."""
    with torch.no_grad():
        outputs = [(_layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
    for module in layer.modules():  # free the last batch the siblings shared
        if isinstance(module, QuantLinear) and module.shared_input is not None:
            module.shared_input.clear()
    return outputs


def finish_run(run: PipelineRun, inputs: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
    """Quantize the LM head if the targets ask for it (on the last layer's ``inputs``), hold floats in
    storage, and quantize the embedding table last if the settings ask for it."""
    if run.targets is not None and run.targets.head is not None:
        job = run.job(len(run.adapter.layers()), run.adapter.model, inputs, [], settings=run.targets.head)
        run.report.places += quantize_head(run.adapter, job)
    hold_in_storage(run.adapter.model)
    if run.settings.embedding_bits is not None:
        # Last: the model scope rotated the table and calibration read it in float; from here on
        # only the codes remain.
        run.report.embedding = str(quantize_embedding(run.adapter.model, run.settings.embedding_bits).spec)
    run.report.seconds = time.perf_counter() - run.started


def check_embedding_setting(
    adapter: ModelAdapter, plan: ModelPlan | None, settings: QuantSettings, targets: PlaceTargets | None
) -> None:
    """Refuse ``embedding_bits`` before any work when the LM head would stay a float view of the table.

    A head tied to the embedding that no model-scope plan unties (fused norms
    do) and no target quantizes would need a float copy of the table; the
    copy makes the model larger than one float table, so it is an error
    rather than a silent change of the head.
    """
    if settings.embedding_bits is None:
        return
    untied_by_plan = plan is not None and plan.fuse_norms
    head_quantized = targets is not None and targets.head is not None
    if adapter.tied_embeddings() and not untied_by_plan and not head_quantized:
        raise QuantSpecError(tied_head_message(settings.embedding_bits))


class _HeadBlock(nn.Module):
    """The final norm and the LM head as one block, so the head is quantized like a layer's place."""

    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = head

    def forward(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


#: The LM head's input place: the final norm (a diagonal scale folds into its weight) feeds it alone.
HEAD_PLACE = InputPlace("lm_head", ("lm_head",), "norm", "norm", "diagonal", "head")


def quantize_head(adapter: ModelAdapter, job: LayerJob) -> list[dict[str, Any]]:
    """Quantize the LM head as one more place, calibrated on the last layer's outputs in ``job.inputs``.

    A head tied to the embedding is untied first (the embedding keeps its
    float weight). The strategy plans the place like any other, at its place
    scope only.
    """
    adapter.untie_embeddings()
    head = adapter.lm_head()
    name = next(n for n, m in adapter.model.named_modules() if m is head)
    block = _HeadBlock(adapter.final_norm(), head)
    summary = _quantize_group(replace(job, layer=block, places=[HEAD_PLACE]), [HEAD_PLACE], layer_scope=False)
    set_submodule(adapter.model, name, block.lm_head)
    return summary


def _attention_quantizer(settings: QuantSettings, plan: ModelPlan | None) -> AttentionQuantizer | None:
    """Q/K/V quantizers from the settings, with the model plan's online Q/K rotation."""
    spec = settings.qkv_spec()
    if spec is None:
        return None
    rotation = None if plan is None else plan.qk_rotation
    return AttentionQuantizer(q_spec=spec, k_spec=spec, v_spec=spec, qk_rotation=rotation)


def _describe_model_plan(plan: ModelPlan) -> dict[str, Any]:
    def name(t: Transform | None) -> str:
        return "-" if t is None else f"{type(t).__name__}({t.size})"

    return {
        "fuse_norms": plan.fuse_norms,
        "residual": name(plan.residual),
        "value_head": name(plan.value_head),
        "qk_rotation": name(plan.qk_rotation),
        **plan.notes,
    }


def count_quantized(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, QuantLinear))


__all__ = [
    "LayerJob",
    "PipelineRun",
    "QuantizationReport",
    "capture_first_layer_inputs",
    "check_calibration_tokens",
    "check_embedding_setting",
    "finish_run",
    "count_quantized",
    "model_plan_for",
    "prepare",
    "quantize_head",
    "quantize_layer",
    "quantize_layer_step",
    "quantize_model",
    "run_layer",
    "split_absorbable",
    "start_run",
]
