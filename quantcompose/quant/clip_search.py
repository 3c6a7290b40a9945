"""Clipping searches: per row for weight quantizers, per place for activations.

A few large weights in a row stretch its quantization step for all the
others; clipping the row's range trades their error for everyone else's. The
search picks, per output row, the ratio on a grid that minimises the
importance-weighted squared error ``Σ_k h_k (w_k − q(w_k))²`` where ``h_k`` is
the mean square of input channel ``k`` (the diagonal of ``XᵀX``), so errors
on channels that carry large activations count for more.

Activations are quantized per token at run time, so their ratio cannot be
chosen per row; :func:`search_act_clip_ratio` picks one ratio for a whole
input place, the one whose quantization error, pushed through the consuming
weights, is smallest on a calibration sample.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from quantcompose.errors import ShapeError
from quantcompose.quant.functional import _grouped, _reduce_min_max, fake_quantize_with, qparams_from_range
from quantcompose.quant.spec import QuantSpec

#: Elements of a weight processed together by the row clip search (~1 MiB of float32).
SEARCH_CHUNK_ELEMENTS = 1 << 18
DEFAULT_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5
# 1.0 down to 0.6 in steps of 0.025: on SmolLM2-135M W4A4 (DuQuant) the finer
# grid was better than steps of 0.05 on each of three seeds (docs/benchmarks.md).
ACT_GRID = tuple(1.0 - 0.025 * i for i in range(17))
#: Calibration rows scoring each activation clip ratio of a place (a strided subsample).
ACT_SEARCH_ROWS = 256


def search_clip_ratios(
    weight: torch.Tensor,
    spec: QuantSpec,
    importance: torch.Tensor | None = None,
    grid: tuple[float, ...] = DEFAULT_GRID,
) -> torch.Tensor:
    """The best clip ratio per row of ``weight`` (out, in) for a per-channel or per-group ``spec``.

    With groups, one ratio per row shrinks each of its groups' ranges alike
    (see :func:`clamp_to_ratios`).
    """
    if spec.granularity not in ("channel", "group"):
        raise ShapeError(f"clip search works per output channel or group; got a {spec.granularity!r} quantizer")
    w = weight.detach().float()
    h = torch.ones(w.shape[1]) if importance is None else importance.detach().float().to(w.device)
    if h.shape != (w.shape[1],):
        raise ShapeError(f"importance must have shape ({w.shape[1]},), got {tuple(h.shape)}")
    best_ratio = torch.ones(w.shape[0], device=w.device)
    # A chunk of rows stays in cache across the whole grid; the search is memory-bound.
    rows_per_chunk = max(1, SEARCH_CHUNK_ELEMENTS // w.shape[1])
    for start in range(0, w.shape[0], rows_per_chunk):
        chunk = _grouped(w[start : start + rows_per_chunk], spec)
        hg = _grouped(h, spec)
        lo, hi = _reduce_min_max(chunk, spec)
        best_err = torch.full((chunk.shape[0],), float("inf"), device=w.device)
        best = best_ratio[start : start + rows_per_chunk]
        for ratio in grid:
            scale, zero = qparams_from_range(lo, hi, replace(spec, clip_ratio=float(ratio)))
            err = (fake_quantize_with(chunk, scale, zero, spec).sub_(chunk).square_() * hg).flatten(1).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best.masked_fill_(better, float(ratio))
    return best_ratio


def clamp_to_ratios(weight: torch.Tensor, ratios: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight`` clamped so that quantizing it with ``clip_ratio=1`` equals ``clip_ratio=ratios[row]``.

    Per channel that is :func:`clamp_rows`; per group, each group of a row is
    clamped to ``ratio ×`` its own ``[min(group, 0), max(group, 0)]``.
    """
    if spec.granularity != "group":
        return clamp_rows(weight, ratios)
    wg = _grouped(weight, spec)
    r = ratios.to(weight.dtype).reshape(-1, 1, 1)
    lo = wg.amin(dim=-1, keepdim=True).clamp(max=0) * r
    hi = wg.amax(dim=-1, keepdim=True).clamp(min=0) * r
    return torch.maximum(torch.minimum(wg, hi), lo).reshape(weight.shape)


def clamp_rows(weight: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """``weight`` clamped per row to ``ratio × [min(row, 0), max(row, 0)]``.

    Quantizing the result with ``clip_ratio=1`` gives the same grid as
    quantizing the original row with ``clip_ratio=ratio``.
    """
    r = ratios.to(weight.dtype).unsqueeze(1)
    lo = weight.amin(dim=1, keepdim=True).clamp(max=0) * r
    hi = weight.amax(dim=1, keepdim=True).clamp(min=0) * r
    return torch.maximum(torch.minimum(weight, hi), lo)


def search_act_clip_ratio(
    sample: torch.Tensor,
    spec: QuantSpec,
    weight: torch.Tensor,
    grid: tuple[float, ...] = ACT_GRID,
) -> float:
    """The activation clip ratio on ``grid`` with the least output error.

    ``sample`` (tokens, in) holds the activations as the quantizer sees them
    (after the transform); ``weight`` (out, in) stacks the linears that consume
    them, so ``‖e·Wᵀ‖² = e·(WᵀW)·eᵀ`` is the squared output error that the
    activation error ``e`` causes. Whichever of the two forms is cheaper
    (fewer outputs than inputs, or the other way round) is used.
    """
    if spec.granularity != "token":
        raise ShapeError(f"activation clip search works per token; got a {spec.granularity!r} quantizer")
    x = sample.detach().float()
    w = weight.detach().float().to(x.device)
    if w.dim() != 2 or w.shape[1] != x.shape[1]:
        raise ShapeError(f"weight must be (out, {x.shape[1]}), got {tuple(w.shape)}")
    through_weight = w.shape[0] < w.shape[1]
    gram = None if through_weight else w.T @ w
    lo, hi = _reduce_min_max(x, spec)
    best_ratio, best_err = 1.0, float("inf")
    for ratio in grid:
        scale, zero = qparams_from_range(lo, hi, replace(spec, clip_ratio=float(ratio)))
        e = fake_quantize_with(x, scale, zero, spec).sub_(x)
        err = float((e @ w.T).pow(2).sum()) if through_weight else float(((e @ gram) * e).sum())
        if err < best_err:
            best_ratio, best_err = float(ratio), err
    return best_ratio


def searched_act_spec(spec: QuantSpec, seen: torch.Tensor, weight: torch.Tensor) -> QuantSpec:
    """``spec`` with the clip ratio :func:`search_act_clip_ratio` picks for one place.

    ``seen`` are the place's transformed calibration activations; a strided
    subsample of :data:`ACT_SEARCH_ROWS` of them spans every calibration batch
    and keeps the search cheap. ``weight`` stacks the consuming linears.
    """
    rows = seen[:: max(1, seen.shape[0] // ACT_SEARCH_ROWS)]
    # float32 weights: the search only ranks ratios.
    return replace(spec, clip_ratio=search_act_clip_ratio(rows, spec, weight.float()))


def row_clip_ratios(weight: torch.Tensor, spec: QuantSpec, seen: torch.Tensor | None) -> torch.Tensor:
    """One clip ratio per row of ``weight``: searched, weighted by ``seen``'s mean squares, or ``spec.clip_ratio``.

    ``seen`` (the transformed calibration activations) ``None`` means no search.
    """
    if seen is None:
        return torch.full((weight.shape[0],), spec.clip_ratio, dtype=weight.dtype)
    return search_clip_ratios(weight, spec, seen.pow(2).mean(dim=0))
