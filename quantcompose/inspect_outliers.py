"""Where the activation outliers are, and what a strategy's transform does to them.

For one decoder layer and input place, :func:`inspect_place` collects the
full-precision activations that feed the place on calibration tokens, asks
the strategy for its plan from statistics of the kind the pipeline gives it
(max |x| per channel over every token, a row sample, the consuming weights;
the pipeline gathers them behind already quantized layers, this module
behind full-precision ones), and applies the plan's activation transform atom by atom (for DuQuant:
smooth, rotation, zigzag permutation, second rotation). It records after
each step the magnitude landscape of one calibration sequence (the one that
holds the largest input entry; tokens ×
channels, the pictures of the DuQuant paper, Lin et al. 2024, Figs. 1 and 3),
summary figures over every calibration token, and, around a permutation, the
per-block maxima whose balance the zigzag permutation is meant to improve.

The transform inspected is the plan's, as the strategy defines it. The
pipeline may fold its leading ``Scale`` into the norm or linear before the
place; the activations the quantizer meets are the same either way.

:func:`inspect_layers` gives one summary per layer and place (before and
after the whole transform); the ``plot_*`` and ``format_*`` functions turn
the results into PNG files and text.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from quantcompose.errors import QuantComposeError
from quantcompose.model_scope import model_facts
from quantcompose.models import InputPlace, get_adapter
from quantcompose.pipeline import capture_first_layer_inputs
from quantcompose.plugin_manager import StrategyManager, get_plugin_manager
from quantcompose.strategy import ModelFacts, PlaceStats, QuantSettings
from quantcompose.transforms import BlockDiagonal, Compose, Identity, Permutation, Transform

__all__ = [
    "BlockBalance",
    "InspectionError",
    "MagnitudeSummary",
    "Outlier",
    "PlaceInspection",
    "Step",
    "format_layer_table",
    "format_summary",
    "inspect_layers",
    "inspect_place",
    "layer_place_inputs",
    "plot_block_maxima",
    "plot_landscapes",
    "write_inspection",
]

#: Massive activations after Sun et al., "Massive Activations in Large Language
#: Models" (2024, arXiv 2402.17762): magnitudes above 100 and about 1,000 times
#: the median magnitude.
MASSIVE_MIN = 100.0
MASSIVE_OVER_MEDIAN = 1000.0
#: Calibration rows handed to the strategy as ``act_sample`` (the pipeline's default).
SAMPLE_ROWS = 2048
#: The landscape surfaces are max-pooled to at most this many cells per axis,
#: so that a single outlier stays visible and matplotlib stays quick.
SURFACE_CELLS = (128, 192)


class InspectionError(QuantComposeError, ValueError):
    """The layer or place asked for does not exist in this model."""


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class MagnitudeSummary:
    """Figures of one activation matrix ``(tokens, channels)``."""

    max_abs: float
    median_abs: float
    max_over_median: float
    kurtosis: float  # Pearson's (a normal distribution has 3), over every entry
    row: int  # where the largest |x| is
    channel: int

    @classmethod
    def of(cls, x: torch.Tensor) -> "MagnitudeSummary":
        magnitude = x.abs()
        index = int(magnitude.argmax())
        max_abs = float(magnitude.flatten()[index])
        median = float(magnitude.median())
        centred = x.double().flatten()
        centred = centred - centred.mean()
        variance = float(centred.pow(2).mean())
        kurtosis = float(centred.pow(4).mean()) / variance**2 if variance > 0 else math.nan
        return cls(
            max_abs=max_abs,
            median_abs=median,
            max_over_median=max_abs / median if median > 0 else math.inf,
            kurtosis=kurtosis,
            row=index // x.shape[1],
            channel=index % x.shape[1],
        )


@dataclass(frozen=True)
class Outlier:
    """One large activation entry: where it is and its signed value."""

    layer: int
    place: str
    sequence: int
    position: int  # token position inside its calibration sequence
    channel: int
    value: float


@dataclass(frozen=True)
class BlockBalance:
    """Per-block max |x| before and after a permutation, with their population variances."""

    block_size: int
    before: torch.Tensor  # (blocks,)
    after: torch.Tensor
    variance_before: float
    variance_after: float


@dataclass
class Step:
    """The activations after one step of the transform (step 0: the input itself)."""

    name: str
    summary: MagnitudeSummary
    channel_absmax: torch.Tensor  # (channels,) max |x| over every calibration token
    landscape: torch.Tensor | None  # (seqlen, channels) |x| of one calibration sequence (PlaceInspection says which)


@dataclass
class PlaceInspection:
    """What :func:`inspect_place` found at one layer and place."""

    layer: int
    place: str
    linears: tuple[str, ...]
    method: str
    options: dict[str, Any]
    transform: Transform  # the plan's activation transform
    seqlen: int
    sequences: int
    landscape_sequence: int  # the calibration sequence the landscapes show (the one holding the input's max)
    steps: list[Step]
    outliers: list[Outlier]
    massive_count: int  # entries meeting the massive-activation criterion, over every calibration token
    blocks: BlockBalance | None  # None when the transform has no permutation
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def before(self) -> MagnitudeSummary:
        return self.steps[0].summary

    @property
    def after(self) -> MagnitudeSummary:
        return self.steps[-1].summary


# --------------------------------------------------------------------------- collecting


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Recorder:
    """Forward pre-hook keeping every row a linear receives, as float32 on the CPU."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        self.rows.append(x.reshape(-1, x.shape[-1]).float().cpu())


def _check_layers(model: nn.Module, wanted: Collection[int]) -> int:
    count = len(get_adapter(model).layers())
    bad = sorted(i for i in wanted if not 0 <= i < count)
    if bad:
        raise InspectionError(f"layer(s) {bad} out of range: this model has layers 0..{count - 1}")
    return count


@torch.no_grad()
def layer_place_inputs(
    model: nn.Module, tokens: torch.Tensor, layers: Collection[int] | None = None, batch_size: int = 4
) -> Iterator[tuple[int, nn.Module, dict[str, torch.Tensor]]]:
    """For each decoder layer in order: ``(index, layer, {place: inputs (rows, channels)})``.

    The rows are the calibration tokens, sequence after sequence (row
    ``s·seqlen + t`` is token ``t`` of sequence ``s``), through the
    full-precision model. Only the layers in ``layers`` (default: all) are
    yielded; the walk stops after the last of them, and only one layer's
    activations are held at a time.
    """
    adapter = get_adapter(model)
    all_layers = adapter.layers()
    wanted = set(range(len(all_layers))) if layers is None else set(layers)
    _check_layers(model, wanted)
    last = max(wanted)
    inputs = capture_first_layer_inputs(model, all_layers, tokens, batch_size)
    for index in range(last + 1):
        layer = all_layers[index]
        recorders: dict[str, _Recorder] = {}
        handles = []
        if index in wanted:
            for place in adapter.places(layer):
                recorders[place.name] = _Recorder()
                handles.append(layer.get_submodule(place.linears[0]).register_forward_pre_hook(recorders[place.name]))
        try:
            inputs = [(_layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
        finally:
            for handle in handles:
                handle.remove()
        if index in wanted:
            yield index, layer, {name: torch.cat(r.rows) for name, r in recorders.items()}


def _place_stats(
    layer_index: int,
    layer: nn.Module,
    place: InputPlace,
    x: torch.Tensor,
    generator: torch.Generator,
    facts: ModelFacts | None = None,
) -> PlaceStats:
    """The statistics the pipeline hands a strategy: max |x| over all rows, a row sample, the weights."""
    keep = torch.randperm(x.shape[0], generator=generator)[:SAMPLE_ROWS]
    return PlaceStats(
        layer_index=layer_index,
        place=place.name,
        act_absmax=x.abs().amax(dim=0),
        act_sample=x[keep],
        weights={name: layer.get_submodule(name).weight.detach().float().cpu() for name in place.linears},
        absorbable=place.absorbable,
        model=facts,
        shared_heads=place.shared_heads,
    )


def _atoms(transform: Transform) -> list[Transform]:
    if isinstance(transform, Compose):
        return list(transform.transforms)
    return [] if isinstance(transform, Identity) else [transform]


def _block_maxima(channel_absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.stack([chunk.max() for chunk in channel_absmax.split(block_size)])


def _block_balance(atoms: list[Transform], steps: list[Step]) -> BlockBalance | None:
    """Per-block maxima around the first permutation, in blocks of the first block rotation's size."""
    where = next((i for i, atom in enumerate(atoms) if isinstance(atom, Permutation)), None)
    rotation = next((atom for atom in atoms if isinstance(atom, BlockDiagonal)), None)
    if where is None or rotation is None:
        return None
    size = int(rotation.blocks[0].shape[0])
    # steps[0] is the input, so the permutation's input is steps[where] and its output steps[where + 1].
    before = _block_maxima(steps[where].channel_absmax, size)
    after = _block_maxima(steps[where + 1].channel_absmax, size)
    return BlockBalance(size, before, after, float(before.var(unbiased=False)), float(after.var(unbiased=False)))


def _outliers(x: torch.Tensor, layer: int, place: str, seqlen: int, top: int) -> list[Outlier]:
    magnitude = x.abs().flatten()
    found = []
    for index in magnitude.topk(min(top, magnitude.numel())).indices.tolist():
        row, channel = divmod(index, x.shape[1])
        found.append(Outlier(layer, place, row // seqlen, row % seqlen, channel, float(x[row, channel])))
    return found


def _inspect_activations(
    x: torch.Tensor,
    layer_index: int,
    layer: nn.Module,
    place: InputPlace,
    method: str,
    options: dict[str, Any],
    settings: QuantSettings,
    manager: StrategyManager,
    seqlen: int,
    top: int,
    landscapes: bool,
    facts: ModelFacts | None = None,
) -> PlaceInspection:
    generator = torch.Generator().manual_seed(settings.seed)
    stats = _place_stats(layer_index, layer, place, x, generator, facts)
    plan = manager.plan(method, stats, options, settings)
    atoms = _atoms(plan.transform)

    # The landscape is drawn for the sequence that holds the input's largest entry.
    first = MagnitudeSummary.of(x)
    shown = slice((first.row // seqlen) * seqlen, (first.row // seqlen + 1) * seqlen)

    def step(name: str, values: torch.Tensor, summary: MagnitudeSummary | None = None) -> Step:
        return Step(
            name,
            summary or MagnitudeSummary.of(values),
            values.abs().amax(dim=0),
            values[shown].abs().clone() if landscapes else None,
        )

    steps = [step("input", x, first)]
    current = x
    for atom in atoms:
        current = atom(current)
        steps.append(step(type(atom).__name__, current))
    summary = steps[0].summary
    massive = int(((x.abs() > MASSIVE_MIN) & (x.abs() > MASSIVE_OVER_MEDIAN * summary.median_abs)).sum())
    return PlaceInspection(
        layer=layer_index,
        place=place.name,
        linears=place.linears,
        method=method,
        options=dict(options),
        transform=plan.transform,
        seqlen=seqlen,
        sequences=x.shape[0] // seqlen,
        landscape_sequence=first.row // seqlen,
        steps=steps,
        outliers=_outliers(x, layer_index, place.name, seqlen, top),
        massive_count=massive,
        blocks=_block_balance(atoms, steps),
        notes={k: v for k, v in plan.notes.items() if isinstance(v, (int, float, str, bool))},
    )


def _find_place(model: nn.Module, layer: nn.Module, name: str) -> InputPlace:
    places = get_adapter(model).places(layer)
    for place in places:
        if place.name == name:
            return place
    raise InspectionError(f"no input place {name!r}; this model's places are {[p.name for p in places]}")


def _resolve(method: str, options: dict[str, Any] | None, manager: StrategyManager | None, settings: QuantSettings):
    manager = manager or get_plugin_manager()
    return manager, manager.resolve(method, options, settings)


def inspect_place(
    model: nn.Module,
    tokens: torch.Tensor,
    layer: int,
    place: str,
    method: str = "duquant",
    options: dict[str, Any] | None = None,
    settings: QuantSettings | None = None,
    *,
    manager: StrategyManager | None = None,
    top: int = 5,
    batch_size: int = 4,
) -> PlaceInspection:
    """Inspect the input of ``place`` in decoder layer ``layer`` on calibration ``tokens`` ``(n, seqlen)``.

    ``options`` are the strategy's (strings are parsed as on the command
    line); ``settings`` give the bits and seed the strategy plans for. The
    landscapes are of the calibration sequence that holds the input's largest
    entry; every other figure is over all calibration tokens. ``model`` is not modified.
    """
    settings = settings or QuantSettings()
    manager, resolved = _resolve(method, options, manager, settings)
    _check_layers(model, [layer])
    target = _find_place(model, get_adapter(model).layers()[layer], place)
    for index, module, inputs in layer_place_inputs(model, tokens, [layer], batch_size):
        return _inspect_activations(
            inputs[target.name], index, module, target, method, resolved, settings, manager,
            tokens.shape[1], top, landscapes=True, facts=model_facts(get_adapter(model)),
        )
    raise AssertionError("unreachable: layer_place_inputs yields the layer asked for")


def inspect_layers(
    model: nn.Module,
    tokens: torch.Tensor,
    method: str = "duquant",
    options: dict[str, Any] | None = None,
    settings: QuantSettings | None = None,
    *,
    manager: StrategyManager | None = None,
    layers: Collection[int] | None = None,
    top: int = 1,
    batch_size: int = 4,
    progress: bool = True,
) -> list[PlaceInspection]:
    """:func:`inspect_place` for every place of every layer (or of ``layers``), without landscapes."""
    settings = settings or QuantSettings()
    manager, resolved = _resolve(method, options, manager, settings)
    count = len(get_adapter(model).layers()) if layers is None else len(set(layers))
    found: list[PlaceInspection] = []
    walk = layer_place_inputs(model, tokens, layers, batch_size)
    for index, module, inputs in tqdm(walk, total=count, desc="inspect layers", disable=not progress):
        for place in get_adapter(model).places(module):
            found.append(_inspect_activations(
                inputs[place.name], index, module, place, method, resolved, settings, manager,
                tokens.shape[1], top, landscapes=False, facts=model_facts(get_adapter(model)),
            ))
    return found


# --------------------------------------------------------------------------- text


def _g(value: float) -> str:
    return f"{value:.4g}"


def format_summary(inspection: PlaceInspection) -> str:
    """A text report: where the largest entries are, and the figures after each step."""
    i = inspection
    width = i.steps[0].channel_absmax.numel()
    lines = [
        f"layer {i.layer} {i.place} (input of {', '.join(i.linears)}; {width} channels), "
        f"{i.sequences} calibration sequences of {i.seqlen} tokens, full-precision model",
        f"method {i.method}: transform {' · '.join(s.name for s in i.steps[1:]) or 'identity'} "
        "(the plan's activation transform, applied in this order)",
        "",
        f"largest |x| at the input ({i.massive_count} massive entries: |x| > {MASSIVE_MIN:g} and "
        f"> {MASSIVE_OVER_MEDIAN:g} x median |x|, after Sun et al. 2024):",
        "  layer  place      sequence  token  channel  value",
    ]
    for o in i.outliers:
        lines.append(f"  {o.layer:<5}  {o.place:<9}  {o.sequence:<8}  {o.position:<5}  {o.channel:<7}  {o.value:.4g}")
    lines += ["", "  step            max |x|     median |x|  max/median  kurtosis  (token, channel) of max"]
    for s in i.steps:
        m = s.summary
        where = f"({m.row % i.seqlen}, {m.channel})"
        lines.append(
            f"  {s.name:<14}  {_g(m.max_abs):<10}  {_g(m.median_abs):<10}  {_g(m.max_over_median):<10}  "
            f"{_g(m.kurtosis):<8}  {where}"
        )
    if i.blocks is not None:
        b = i.blocks
        lines += [
            "",
            f"per-block max |x| around the permutation (blocks of {b.block_size}): "
            f"variance {_g(b.variance_before)} before, {_g(b.variance_after)} after",
            "  before: " + " ".join(_g(v) for v in b.before.tolist()),
            "  after:  " + " ".join(_g(v) for v in b.after.tolist()),
        ]
    return "\n".join(lines) + "\n"


def format_layer_table(inspections: list[PlaceInspection]) -> str:
    """One line per layer and place: max |x|, max/median and kurtosis before and after the transform."""
    header = (
        "layer  place      max_before  max/med_before  kurt_before  token  channel  "
        "max_after  max/med_after  kurt_after"
    )
    lines = [header]
    for i in inspections:
        b, a = i.before, i.after
        lines.append(
            f"{i.layer:<5}  {i.place:<9}  {_g(b.max_abs):<10}  {_g(b.max_over_median):<14}  {_g(b.kurtosis):<11}  "
            f"{b.row % i.seqlen:<5}  {b.channel:<7}  {_g(a.max_abs):<9}  {_g(a.max_over_median):<13}  {_g(a.kurtosis)}"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- pictures


def _max_pool(values: torch.Tensor, cells: tuple[int, int]) -> torch.Tensor:
    """Max over tiles so that the grid has at most ``cells`` points per axis."""
    rows = math.ceil(values.shape[0] / cells[0])
    cols = math.ceil(values.shape[1] / cells[1])
    pooled = torch.nn.functional.max_pool2d(values[None, None], (rows, cols), ceil_mode=True)
    return pooled[0, 0]


def _surface(ax: Any, landscape: torch.Tensor, title: str) -> None:
    pooled = _max_pool(landscape, SURFACE_CELLS)
    tiles_t = math.ceil(landscape.shape[0] / SURFACE_CELLS[0])
    tiles_c = math.ceil(landscape.shape[1] / SURFACE_CELLS[1])
    tokens = torch.arange(pooled.shape[0]) * tiles_t
    channels = torch.arange(pooled.shape[1]) * tiles_c
    grid_c, grid_t = torch.meshgrid(channels, tokens, indexing="xy")
    ax.plot_surface(grid_c.numpy(), grid_t.numpy(), pooled.numpy(), cmap="coolwarm", linewidth=0, antialiased=False)
    ax.set_xlabel("channel", fontsize=8)
    ax.set_ylabel("token", fontsize=8)
    ax.set_zlabel("|x|", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)


def _stem(i: PlaceInspection) -> str:
    return f"layer{i.layer}_{i.place}_{i.method}"


def plot_landscapes(inspection: PlaceInspection, out_dir: str | os.PathLike[str]) -> list[Path]:
    """One 3-D magnitude landscape PNG per step, and one with every step side by side.

    Each surface is |x| of the calibration sequence holding the input's
    largest entry (tokens × channels),
    max-pooled to at most ``SURFACE_CELLS`` points per axis; each has its own
    vertical scale, written in its title.
    """
    from quantcompose.plotting import pyplot

    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in inspection.steps if s.landscape is not None]
    if not steps:
        raise InspectionError("this inspection kept no landscapes (inspect_layers drops them); use inspect_place")
    paths: list[Path] = []

    def title(k: int, s: Step) -> str:
        label = "input" if k == 0 else f"after {k}: {s.name}"
        return (
            f"layer {inspection.layer} {inspection.place}, {label}\n"
            f"sequence {inspection.landscape_sequence}: max |x| {float(s.landscape.max()):.4g} "
            f"({s.summary.max_abs:.4g} over all)"
        )

    for k, s in enumerate(steps):
        fig = plt.figure(figsize=(6, 4.8))
        _surface(fig.add_subplot(projection="3d"), s.landscape, title(k, s))
        path = out / f"{_stem(inspection)}_step{k}_{s.name.lower()}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig = plt.figure(figsize=(4.2 * len(steps), 4.2))
    for k, s in enumerate(steps):
        _surface(fig.add_subplot(1, len(steps), k + 1, projection="3d"), s.landscape, title(k, s))
    path = out / f"{_stem(inspection)}_steps.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


def plot_block_maxima(inspection: PlaceInspection, out_dir: str | os.PathLike[str]) -> Path | None:
    """Bars of the per-block max |x| before and after the permutation (None without one)."""
    b = inspection.blocks
    if b is None:
        return None
    from quantcompose.plotting import pyplot

    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, values, label, variance in (
        (axes[0], b.before, "before the permutation", b.variance_before),
        (axes[1], b.after, "after the zigzag permutation", b.variance_after),
    ):
        ax.bar(range(len(values)), values.tolist(), color="tab:blue" if ax is axes[0] else "tab:orange")
        ax.set_title(f"{label}\nvariance {variance:.4g}", fontsize=9)
        ax.set_xlabel(f"block of {b.block_size} channels", fontsize=8)
    axes[0].set_ylabel("max |x| in the block", fontsize=8)
    fig.suptitle(f"layer {inspection.layer} {inspection.place}, {inspection.method}", fontsize=10)
    fig.tight_layout()
    path = out / f"{_stem(inspection)}_block_max.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_inspection(inspection: PlaceInspection, out_dir: str | os.PathLike[str]) -> list[Path]:
    """The landscapes, the block-maximum chart (if any) and ``summary.txt`` into ``out_dir``."""
    out = Path(out_dir)
    paths = plot_landscapes(inspection, out)
    block = plot_block_maxima(inspection, out)
    if block is not None:
        paths.append(block)
    summary = out / f"{_stem(inspection)}_summary.txt"
    summary.write_text(format_summary(inspection), encoding="utf-8")
    return [*paths, summary]
