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

from quantcompose.errors import CalibrationError
from quantcompose.models import InputPlace, get_adapter, get_submodule, set_submodule
from quantcompose.plugin_manager import StrategyManager, get_plugin_manager
from quantcompose.qlinear import QuantLinear, SharedInput
from quantcompose.quant import QuantSpec, clamp_rows, fake_quantize, search_act_clip_ratio, search_clip_ratios
from quantcompose.quant.gptq import gptq_quantize
from quantcompose.strategy import PlaceStats, Plan, QuantSettings
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


#: Calibration rows scoring each activation clip ratio (a strided subsample).
ACT_SEARCH_ROWS = 256


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


def split_absorbable(transform: Transform, absorbable: str) -> tuple[Transform | None, Transform | None]:
    """Split ``T`` into (part folded into the previous module, part run online), ``T = A·R``."""
    if absorbable == "any":
        return transform, None
    if absorbable == "diagonal":
        if isinstance(transform, Scale):
            return transform, None
        if isinstance(transform, Compose) and isinstance(transform.transforms[0], Scale):
            rest = list(transform.transforms[1:])
            online = rest[0] if len(rest) == 1 else Compose(rest)
            return transform.transforms[0], online
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
            weight, bias = absorbed.fold_into_output(prev.weight.data, None if prev.bias is None else prev.bias.data)
            prev.weight.data.copy_(weight)
            if prev.bias is not None:
                prev.bias.data.copy_(bias)
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


def quantize_layer(
    layer: nn.Module,
    layer_index: int,
    places: list[InputPlace],
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    method: str,
    options: dict[str, Any],
    settings: QuantSettings,
    manager: StrategyManager,
    sample_rows: int,
    generator: torch.Generator,
    kv_spec: QuantSpec | None = None,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Calibrate, plan, fold and quantize one decoder layer in place.

    ``workers`` threads fit the places' plans and quantize their weights side
    by side (the strategy's ``quantcompose_plan`` may then run concurrently
    for different places; results do not depend on ``workers``).
    """
    groups = sequential_groups(places) if settings.true_sequential else [list(places)]
    summary: list[dict[str, Any]] = []
    for group in groups:
        summary += _quantize_group(
            layer, layer_index, group, inputs, method, options, settings, manager,
            sample_rows, generator, kv_spec, workers,
        )
    return summary


def sequential_groups(places: list[InputPlace]) -> list[list[InputPlace]]:
    """The places split by the submodule that holds their linears (attention, MLP), in order.

    Quantizing group by group lets each group calibrate on the activations the
    already quantized groups produce (GPTQ's "true sequential"). A group's
    transform may be folded into a linear of its own group only, which is not
    yet quantized when it is folded; if a place would fold into an earlier
    group, everything stays one group.
    """
    groups: list[list[InputPlace]] = []
    parents: list[str] = []
    for place in places:
        parent = place.linears[0].rpartition(".")[0]
        if parents and parents[-1] == parent:
            groups[-1].append(place)
        else:
            groups.append([place])
            parents.append(parent)
    for i, group in enumerate(groups):
        earlier = {name for g in groups[:i] for p in g for name in p.linears}
        if any(p.prev_kind == "linear" and p.prev in earlier for p in group):
            return [list(places)]
    return groups


def _raise_stop(module: nn.Module, args: tuple) -> None:
    raise _StopForward


def _quantize_group(
    layer: nn.Module,
    layer_index: int,
    places: list[InputPlace],
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    method: str,
    options: dict[str, Any],
    settings: QuantSettings,
    manager: StrategyManager,
    sample_rows: int,
    generator: torch.Generator,
    kv_spec: QuantSpec | None,
    workers: int,
) -> list[dict[str, Any]]:
    """Calibrate, plan, fold and quantize ``places`` (in execution order) of one layer."""
    total_rows = sum(hidden.shape[0] * hidden.shape[1] for hidden, _ in inputs)
    gptq = settings.weight_quantizer == "gptq"
    collectors = {p.name: _ActivationStats(total_rows, sample_rows, generator, gptq) for p in places}
    handles = [
        get_submodule(layer, p.linears[0]).register_forward_pre_hook(collectors[p.name]) for p in places
    ]
    # Nothing after the last place's input is needed: stop the layer there.
    handles.append(get_submodule(layer, places[-1].linears[0]).register_forward_pre_hook(_raise_stop))
    try:
        with torch.no_grad():
            for hidden, kwargs in inputs:
                try:
                    layer(hidden, **kwargs)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()

    all_stats: list[PlaceStats] = []
    samples: dict[str, torch.Tensor] = {}
    for place in places:
        collector = collectors[place.name]
        if collector.absmax is None:
            raise CalibrationError(f"layer {layer_index} place {place.name!r} saw no calibration activations")
        _check_finite(collector.absmax, f"the inputs of layer {layer_index} at {place.name!r}")
        weights = {name: get_submodule(layer, name).weight.detach().float() for name in place.linears}
        stats = PlaceStats(
            layer_index=layer_index,
            place=place.name,
            act_absmax=collector.absmax.cpu(),
            act_sample=samples.setdefault(place.name, collector.sample()),
            weights={k: v.cpu() for k, v in weights.items()},
            absorbable=place.absorbable,
        )
        all_stats.append(stats)
    fitted = _in_parallel(
        lambda stats: manager.plan(method, stats, options, settings), all_stats, workers, cost=lambda st: st.width
    )
    plans: list[tuple[InputPlace, Plan]] = list(zip(places, fitted))

    # Output-side folds (into norms, v_proj, up_proj) and input-side folds
    # (into the consuming linears) multiply the weight from opposite sides, so
    # they commute: do all of them on float weights before quantizing any.
    summary: list[dict[str, Any]] = []
    online_of: dict[str, Transform | None] = {}
    for place, plan in plans:
        absorbed, online = split_absorbable(plan.transform, place.absorbable)
        if absorbed is not None:
            _fold_into_previous(layer, place, absorbed)
        online_of[place.name] = online
        summary.append({"layer": layer_index, "place": place.name, **_describe(plan, online, absorbed)})

    def quantize_one(item: tuple[InputPlace, Plan]) -> QuantSpec | None:
        place, plan = item
        xtx = collectors[place.name].xtx
        if xtx is not None:
            xtx = xtx.double().cpu() / collectors[place.name].count
        return _quantize_place(layer, place, plan, online_of[place.name], samples[place.name], xtx, settings, kv_spec)

    # Each place replaces its own linears, so places can be quantized side by side;
    # GPTQ and the searches grow with the input width.
    quantized = _in_parallel(quantize_one, plans, workers, cost=lambda item: item[1].transform.size)
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
    layer: nn.Module,
    place: InputPlace,
    plan: Plan,
    online: Transform | None,
    sample: torch.Tensor,
    xtx: torch.Tensor | None,  # mean xᵀx over all calibration rows, for GPTQ
    settings: QuantSettings,
    kv_spec: QuantSpec | None,
) -> QuantSpec | None:
    """Fold ``plan``'s transform into the place's linears and replace them by QuantLinears.

    Returns the activation quantizer used (its clip ratio searched when
    ``settings.act_clip_search``).
    """
    linears = [get_submodule(layer, name) for name in place.linears]
    folded = [
        plan.transform.fold_into_weight(lin.weight.data.double(), None if lin.bias is None else lin.bias.data)
        for lin in linears
    ]
    weights = [w for w, _ in folded]
    spec = plan.weight_spec
    per_channel = spec is not None and spec.granularity == "channel"
    act_spec = plan.act_spec
    search_act = act_spec is not None and settings.act_clip_search
    # What the weights will see: the transformed calibration activations, read by
    # the activation clip search, the weight clip search and GPTQ's noise term.
    gptq_noise = xtx is not None and act_spec is not None
    needs_seen = search_act or (per_channel and (settings.weight_clip_search or gptq_noise))
    seen = plan.transform(sample.float()) if needs_seen else None
    # Sibling linears share their input, so the searches and GPTQ see them stacked.
    stacked = torch.cat(weights)
    if search_act:
        # A strided subsample spans every calibration batch and keeps the error cheap.
        act_rows = seen[:: max(1, seen.shape[0] // ACT_SEARCH_ROWS)]
        # float32 weights: the search only ranks ratios.
        act_spec = replace(act_spec, clip_ratio=search_act_clip_ratio(act_rows, act_spec, stacked.float()))
    specs: list[QuantSpec | None] = [spec] * len(linears)
    quantized: list[Any] = [None] * len(linears)
    if per_channel and (settings.weight_clip_search or xtx is not None):
        # Per-row ranges and GPTQ are about the activations the weights will
        # see; sibling linears share those, so they are done once.
        hessian = None
        if xtx is not None:
            # (XT)ᵀ(XT) = Tᵀ(XᵀX)T: transform the rows of the symmetric XᵀX, then the columns.
            hessian = plan.transform(plan.transform(xtx).T)
            if act_spec is not None:
                # The weights will meet quantized activations x̃ = xT + e, and
                # E[x̃ᵀx̃] = TᵀxᵀxT + E[eᵀe] (the cross terms are negligible):
                # the quantization noise acts as a data-driven damping.
                noise = fake_quantize(seen, act_spec) - seen
                hessian = hessian + (noise.T @ noise).double() / noise.shape[0]
        if settings.weight_clip_search:
            importance = seen.pow(2).mean(dim=0)
            ratios = search_clip_ratios(stacked, spec, importance)
        else:
            ratios = torch.full((stacked.shape[0],), spec.clip_ratio, dtype=stacked.dtype)
        range_weight = clamp_rows(stacked, ratios)
        spec = replace(spec, clip_ratio=1.0)
        specs = [spec] * len(linears)
        rows = [w.shape[0] for w in weights]
        if hessian is not None:
            q = gptq_quantize(stacked, hessian, spec, range_weight=range_weight)
            # Each linear owns its pieces: views of one stacked storage cannot be saved (safetensors).
            quantized = [
                replace(q, codes=c.clone(), scale=s.clone(), zero_point=z.clone(), shape=torch.Size(c.shape))
                for c, s, z in zip(q.codes.split(rows), q.scale.split(rows), q.zero_point.split(rows))
            ]
        weights = list(range_weight.split(rows))

    shared = SharedInput() if len(linears) > 1 else None
    for name, linear, weight, (_, bias), layer_spec, q in zip(place.linears, linears, weights, folded, specs, quantized):
        output_spec = kv_spec if kv_spec is not None and name.endswith(("k_proj", "v_proj")) else None
        module = QuantLinear(
            weight.to(linear.weight.dtype),
            bias,
            transform=online,
            act_spec=act_spec,
            weight_spec=layer_spec,
            output_spec=output_spec,
            quantized_weight=q,
        ).to(linear.weight.device)
        module.shared_input = shared
        set_submodule(layer, name, module)
    return act_spec


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
) -> QuantizationReport:
    """Quantize ``model`` in place with the strategy ``method``.

    ``calib_tokens`` is a ``(nsamples, seqlen)`` tensor of token ids. With
    ``settings.wbits == settings.abits == 16`` nothing is quantized and only
    the transforms are applied: the model must then compute what it computed
    before, which is how the tests prove a method's transforms exact.

    ``workers`` (default: torch's intra-op thread count) is how many places of
    a layer are fitted and quantized at once, each on one thread.
    """
    settings = settings or QuantSettings()
    manager = manager or get_plugin_manager()
    info = manager.info(method)
    resolved = info.resolve_options(options)
    if calib_tokens.ndim != 2 or calib_tokens.numel() == 0:
        raise CalibrationError(
            f"calibration tokens must be a non-empty (nsamples, seqlen) tensor, got shape {tuple(calib_tokens.shape)}"
        )
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (calib_tokens.min() < 0 or calib_tokens.max() >= vocab):
        raise CalibrationError(f"calibration token ids must lie in [0, {vocab}); got ids outside that range")

    workers = torch.get_num_threads() if workers is None else max(1, int(workers))
    adapter = get_adapter(model)
    report = QuantizationReport(method, settings, resolved)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    layers = adapter.layers()
    kv_spec = None
    if settings.kv_bits is not None:
        head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        kv_spec = QuantSpec(settings.kv_bits, False, "group", head_dim)

    with torch.no_grad():
        inputs = capture_first_layer_inputs(model, layers, calib_tokens, batch_size)
        for index in tqdm(range(len(layers)), desc=f"{method} layers", disable=not progress):
            layer = layers[index]
            for hidden, _ in inputs:
                _check_finite(hidden, f"the input of layer {index}")
            report.places += quantize_layer(
                layer, index, adapter.places(layer), inputs, method, resolved, settings,
                manager, sample_rows, generator, kv_spec, workers,
            )
            inputs = [(_layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
            for module in layer.modules():  # free the last batch the siblings shared
                if isinstance(module, QuantLinear) and module.shared_input is not None:
                    module.shared_input.clear()
    report.seconds = time.perf_counter() - start
    return report


def count_quantized(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, QuantLinear))


__all__ = ["QuantizationReport", "quantize_model", "quantize_layer", "split_absorbable", "count_quantized"]
