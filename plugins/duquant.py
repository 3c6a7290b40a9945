"""DuQuant: smoothing, then rotation → zigzag permutation → rotation.

Lin et al., "DuQuant: Distributing Outliers via Dual Transformation Makes
Stronger Quantized LLMs", NeurIPS 2024, arXiv 2406.01721. For one input place
the activation transform is (row-vector convention, ``A @ B`` = A first)::

    T = Scale(1/s) @ BlockRotation(R1) @ Permutation(P) @ BlockRotation(R2)

* ``Scale(1/s)``: SmoothQuant-style smoothing, ``s_j = max|X_j|^α / max|W_j|^(1−α)``
  (the weights receive ``s`` when the pipeline folds ``T⁻ᵀ`` into them).
* ``R1``: block-diagonal greedy rotation (Sec. 3.2) fitted on the smoothed
  activations: each block repeatedly moves its largest channel to position 0
  and spreads it with an orthogonal matrix whose first row is uniform.
* ``P``: zigzag permutation dealing channels sorted by their max (after R1)
  over the blocks back and forth, so every block gets a similar share of
  outliers.
* ``R2``: a second greedy block rotation, fitted after the permutation.

Each component is fitted on the statistics *after* the ones before it. The
strategy never touches the model; the pipeline decides what to fold.

Defaults follow the authors' reference implementation (github.com/Hsu1023/
DuQuant, ``run.sh`` for LLaMA-2-7B W4A4): block size 128, 256 rotation steps,
α = 0.6, activation clipping 0.9 (``--lac``), weight clipping 0.8 (``--swc``),
one permutation.

The math lives in :mod:`quantcompose_plugins._duquant_rotation` as plain-tensor
functions; it is re-exported here.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from typing import Any

import torch

from quantcompose.hookspecs import hookimpl
from quantcompose.options import (
    Option,
    in_range,
    integer_at_least,
    optional,
    parse_optional_bool,
    parse_optional_int,
)
from quantcompose.strategy import PlaceStats, Plan, QuantSettings, Strategy, clip_options
from quantcompose.transforms import BlockRotation, Compose, Identity, Permutation, Scale, Transform

from ._duquant_rotation import (
    apply_blocks,
    block_sizes,
    greedy_block_rotation,
    nearest_orthogonal,
    random_orthogonal,
    smooth_factors,
    step_base_matrix,
    uniform_first_row_matrix,
    zigzag_permutation,
)

__all__ = [
    "ABLATIONS",
    "INFO",
    "NAME",
    "apply_blocks",
    "block_sizes",
    "build_duquant_transform",
    "fit_duquant",
    "greedy_block_rotation",
    "nearest_orthogonal",
    "DuQuant",
    "STRATEGY",
    "quantcompose_strategies",
    "random_orthogonal",
    "smooth_factors",
    "step_base_matrix",
    "uniform_first_row_matrix",
    "zigzag_permutation",
]

NAME = "duquant"


OPTIONS: dict[str, Option] = {
    "smooth": Option(True, "apply smoothing Scale(1/s) before the rotations"),
    "alpha": Option(
        0.6, "smoothing strength α in [0, 1] (reference run.sh: 0.6 for LLaMA-2 W4A4)", check=in_range(0.0, 1.0)
    ),
    "rotate": Option(True, "first greedy block rotation R1"),
    "block_size": Option(128, "rotation block size (last block may be shorter)", check=integer_at_least(1)),
    "steps": Option(64, check=integer_at_least(0), help="greedy rotation steps per block (reference --max_rotation_step 256; 64 gives the same W4A4 perplexity on SmolLM2 in a quarter of the time, see docs/benchmarks.md)"),
    "eval_tokens": Option(
        64,
        "sample rows (largest norm per block) scoring each greedy step; 0 = all rows (64 and 128 gave the "
        "same W4A4 perplexity on SmolLM2 over three seeds, 64 in less time, see docs/benchmarks.md)",
        check=integer_at_least(0),
    ),
    "permute": Option(True, "zigzag permutation between the two rotations"),
    "second_rotation": Option(
        None, "second greedy rotation R2 after the permutation (default: same as permute)", type=parse_optional_bool
    ),
    # The reference's static ratios (--lac 0.9, --swc 0.8) apply when the clip searches are off.
    **clip_options(0.9, 0.8),
    "seed": Option(
        None,
        "seed for the random rotation factors (default: the settings' seed)",
        type=parse_optional_int,
        check=optional(integer_at_least(0)),
    ),
}

#: The paper's ablation rows (which components are on) as option overrides;
#: use e.g. ``{**ABLATIONS["smooth+rotation"], "alpha": 0.5}``.
ABLATIONS: dict[str, dict[str, Any]] = {
    "smooth": {"smooth": True, "rotate": False, "permute": False, "second_rotation": False},
    "rotation": {"smooth": False, "rotate": True, "permute": False, "second_rotation": False},
    "smooth+rotation": {"smooth": True, "rotate": True, "permute": False, "second_rotation": False},
    "rotation+permutation+rotation": {"smooth": False, "rotate": True, "permute": True, "second_rotation": True},
    "full": {"smooth": True, "rotate": True, "permute": True, "second_rotation": True},
}


def _generator(seed: int, stats: PlaceStats) -> torch.Generator:
    # A stable per-place stream: the same seed gives the same transform, and
    # different layers / places get independent random factors.
    salt = zlib.crc32(f"{stats.layer_index}:{stats.place}".encode())
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + salt) % (2**63))


def fit_duquant(
    stats: PlaceStats,
    options: dict[str, Any] | None = None,
    settings: QuantSettings | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Transform, dict[str, Any]]:
    """Fit DuQuant's transform for one place; returns ``(transform, notes)``.

    ``options`` may be partial (defaults fill in; unknown keys raise). Which
    statistic each step reads:

    * smoothing: ``stats.act_absmax`` (all calibration tokens) and the
      consuming weights' per-input-channel maxima;
    * greedy rotations: ``stats.act_sample`` (tokens, in) transformed by the
      components already chosen, scored on its highest-norm rows per block
      (see :func:`greedy_block_rotation`); without a sample, the vector
      ``act_absmax`` serves as a single row;
    * permutation: per-channel max of the transformed sample after R1 (or
      ``act_absmax / s`` when R1 is off, exact over all tokens).

    ``notes`` records the steps kept per block, the sample max before/after and
    the fit time.
    """
    return _fit(stats, INFO.resolve_options(options), settings, generator)


def _fit(
    stats: PlaceStats,
    opts: dict[str, Any],
    settings: QuantSettings | None,
    generator: torch.Generator | None,
) -> tuple[Transform, dict[str, Any]]:
    """:func:`fit_duquant` on options already resolved and checked (the strategy's path, once per run)."""
    settings = settings if settings is not None else QuantSettings()
    if generator is None:
        generator = _generator(settings.seed if opts["seed"] is None else opts["seed"], stats)
    second = opts["permute"] if opts["second_rotation"] is None else bool(opts["second_rotation"])
    start = time.perf_counter()

    width = stats.width
    bs = int(opts["block_size"])
    eval_tokens = None if opts["eval_tokens"] == 0 else int(opts["eval_tokens"])
    # Fitting runs on the CPU whatever device the statistics live on.
    absmax = stats.act_absmax.detach().to(device="cpu", dtype=torch.float32).flatten()
    sample = stats.act_sample
    if sample is None or sample.dim() != 2 or sample.shape[0] == 0:
        x = absmax[None, :].clone()
    else:
        if sample.shape[-1] != width:
            raise ValueError(f"duquant: act_sample has {sample.shape[-1]} channels, act_absmax has {width}.")
        x = sample.detach().to(device="cpu", dtype=torch.float32)
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    notes: dict[str, Any] = {"sample_max_before": float(x.abs().max())}
    parts: list[Transform] = []

    channel_max: torch.Tensor | None = absmax  # exact per-channel max while only diagonal maps were applied
    if opts["smooth"]:
        s = smooth_factors(absmax, stats.weight_absmax().cpu(), float(opts["alpha"]))
        parts.append(Scale(1.0 / s))
        x = x / s.to(torch.float32)
        channel_max = absmax / s.to(torch.float32)
        notes["smooth_range"] = (float(s.min()), float(s.max()))

    if opts["rotate"]:
        r1, info = greedy_block_rotation(x, bs, int(opts["steps"]), generator, eval_tokens, return_info=True)
        parts.append(BlockRotation(r1))
        x = apply_blocks(x, r1)
        channel_max = None
        notes["r1_steps"] = info["steps_taken"]

    n_blocks = len(block_sizes(width, bs))
    if opts["permute"] and n_blocks > 1:  # one block: a permutation cannot rebalance anything
        cm = x.abs().amax(dim=0) if channel_max is None else channel_max
        perm = zigzag_permutation(cm, bs)
        parts.append(Permutation(perm))
        x = x[:, perm]
        notes["permuted"] = True

    if second:
        r2, info = greedy_block_rotation(x, bs, int(opts["steps"]), generator, eval_tokens, return_info=True)
        parts.append(BlockRotation(r2))
        x = apply_blocks(x, r2)
        notes["r2_steps"] = info["steps_taken"]

    notes["sample_max_after"] = float(x.abs().max())
    notes["fit_seconds"] = time.perf_counter() - start
    if not parts:
        return Identity(width), notes
    return (parts[0] if len(parts) == 1 else Compose(parts)), notes


def build_duquant_transform(
    stats: PlaceStats,
    options: dict[str, Any] | None = None,
    settings: QuantSettings | None = None,
    generator: torch.Generator | None = None,
) -> Transform:
    """``Scale(1/s) @ BlockRotation(R1) @ Permutation(P) @ BlockRotation(R2)`` for one place.

    Components switched off by the options are left out (all off: ``Identity``).
    See :func:`fit_duquant` for which statistic each component is fitted on.
    """
    return fit_duquant(stats, options, settings, generator)[0]


class DuQuant(Strategy):
    """The place-scope DuQuant plan: :func:`fit_duquant`'s transform and the user's quantizers."""

    name = NAME
    description = "DuQuant: smoothing, greedy block rotation, zigzag permutation, second rotation (arXiv 2406.01721)"
    options = OPTIONS
    act_clip_default = 0.9  # reference --lac
    weight_clip_default = 0.8  # reference --swc

    def plan(self, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings) -> Plan:
        transform, notes = _fit(stats, options, settings, None)
        return self.quantizer_plan(transform, options, settings, notes)


STRATEGY = DuQuant()
INFO = STRATEGY.info


@hookimpl
def quantcompose_strategies() -> Iterator[Strategy]:
    yield STRATEGY
