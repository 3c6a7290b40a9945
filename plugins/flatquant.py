"""FlatQuant: a learnable Kronecker-factored affine transform per place, trained layer by layer.

Sun et al., "FlatQuant: Flatness Matters for LLM Quantization", 2024
(arXiv 2410.09426). At each input place of a decoder layer the input becomes
``x·diag(1/s)·(A ⊗ B)`` and the consuming weights ``W·diag(s)·(A ⊗ B)⁻ᵀ``, so
the float product is unchanged for any positive ``s`` and invertible ``A``,
``B``; ``A`` (``m×m``) and ``B`` (``n×n``) with ``m·n`` the place's width
(576 = 24·24, 1536 = 32·48 on SmolLM2-135M, :func:`kronecker_factors`) keep
the online cost at two small matmuls a token. Trained with them, against the
full-precision layer's output (:mod:`quantcompose.learning.trainer`):

* the per-channel smoothing scale ``s`` (started from SmoothQuant's with
  ``alpha``), which folds into the previous module where the place absorbs a
  diagonal and otherwise runs online with the Kronecker transform;
* OmniQuant's learnable weight clipping per output row (LWC);
* one learnable clip ratio per place for the per-token activation quantizer.

After training everything freezes into ordinary atoms: the plan's transform
is ``Compose([Scale(1/s), Kronecker(A, B)])`` and the clips go into the
plan's ``weight_clip_rows`` and activation ``clip_ratio``, so the pipeline
folds, quantizes and saves the layer as for any closed-form plan. A factor
the fit made singular or ill-conditioned is a :class:`TransformError` naming
the layer and place. Not implemented: the paper's transform on the
attention's K/V cache path and its per-head Q/K transforms. With Q/K/V
quantized (``qkv_bits``), training runs with their quantization on, as for
every layer-scope strategy.

Defaults (``epochs=1`` over the first 4 calibration sequences, batch size 1)
are sized for SmolLM2-135M on 2 CPU cores. The paper's settings, for
reference: 15 epochs over 128 WikiText-2 samples of 2048 tokens, AdamW with
lr 5e-3 for the transforms (see the paper for the clipping rates).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from quantcompose.errors import HadamardSizeError, ShapeError, TransformError
from quantcompose.hookspecs import hookimpl
from quantcompose.learning import (
    INIT_LOGIT,
    PlaceQuantizers,
    fit_and_freeze,
    place_quantizers,
    train_options,
    trainer_options,
)
from quantcompose.options import Option, in_range, one_of
from quantcompose.strategy import LayerContext, PlaceStats, Plan, QuantSettings, Strategy
from quantcompose.transforms import Compose, Hadamard, Identity, Scale, Transform
from quantcompose.transforms.learnable import LearnableKronecker

from ._duquant_rotation import smooth_factors

#: How the Kronecker factors start: the identity, normalized Hadamard matrices, or seeded random orthogonal ones.
INITS = ("identity", "hadamard", "orthogonal")


def kronecker_factors(width: int) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = width``, ``m <= n`` and ``m`` as large as possible (576 → 24×24, 1536 → 32×48).

    Raises :class:`ShapeError` for a width with no factorization into two
    factors above 1 (a prime): a 1×width "Kronecker" is a dense matrix.
    """
    if not isinstance(width, int) or width < 4:
        raise ShapeError(f"a Kronecker transform needs an integer width of at least 4, got {width!r}.")
    m = next(d for d in range(math.isqrt(width), 0, -1) if width % d == 0)
    if m == 1:
        raise ShapeError(
            f"width {width} is prime: it has no factorization m·n with m, n > 1, so a Kronecker "
            "transform cannot be placed there. Use another strategy (e.g. duquant) for this model."
        )
    return m, width // m


def initial_factor(size: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """A ``size×size`` float64 starting factor for ``init`` (one of :data:`INITS`).

    ``"hadamard"`` at a size with no Hadamard matrix (not 1, 2 or a supported
    multiple of 4, e.g. 14) starts from a seeded random orthogonal factor, as
    the option's help says: both are rotations, and a model's widths rarely
    all factor into Hadamard orders.
    """
    if init == "identity":
        return torch.eye(size, dtype=torch.float64)
    if init == "hadamard":
        try:
            return Hadamard(size).matrix().to(torch.float64)
        except HadamardSizeError:
            pass
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # the sign fix makes the draw uniform (Haar)


class FlatQuant(Strategy):
    """A learnable smoothing scale and Kronecker transform, LWC and an activation clip per place, fitted per layer."""

    name = "flatquant"
    description = "FlatQuant: learnable Kronecker transforms trained layer by layer (arXiv 2410.09426)"
    options = {
        **trainer_options(epochs=1, samples=4, paper_epochs=15, paper_samples="128 of 2048 tokens"),
        "lr": Option(5e-3, "AdamW learning rate of the Kronecker factors and the log-scale (paper: 5e-3)",
                     check=in_range(0.0, None, low_open=True)),
        "clip_lr": Option(0.1, "AdamW learning rate of the weight and activation clip logits",
                          check=in_range(0.0, None, low_open=True)),
        "init": Option("hadamard", "starting Kronecker factors: identity, hadamard (normalized; seeded random orthogonal at a "
                       "size with no Hadamard matrix) or orthogonal (seeded random)",
                       check=one_of(*INITS)),
        "alpha": Option(0.5, "SmoothQuant migration strength the smoothing scale starts from",
                        check=in_range(0.0, 1.0)),
    }

    def plan(self, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings) -> Plan:
        # The starting scale; fit_layer adds the Kronecker transform and trains both. At 16 bits
        # nothing is trained and this exact Scale is the plan.
        s = smooth_factors(stats.act_absmax, stats.weight_absmax(), float(options["alpha"]))
        return self.quantizer_plan(Scale(1.0 / s), options, settings)

    def fit_layer(
        self, layer: LayerContext, options: dict[str, Any], settings: QuantSettings
    ) -> dict[str, Plan] | None:
        if settings.wbits >= 16 and settings.abits >= 16:  # nothing is quantized: nothing to learn
            return None
        generator = torch.Generator().manual_seed(settings.seed + 7919 * layer.index)
        quantizers = {}
        for p in layer.places:
            plan = layer.plans[p.name]
            m, n = kronecker_factors(plan.transform.size)
            init = str(options["init"])
            kron = LearnableKronecker(m, n, initial_factor(m, init, generator), initial_factor(n, init, generator))
            quantizers[p.name] = place_quantizers(
                layer.layer, p, plan, INIT_LOGIT, learn_scale=isinstance(plan.transform, Scale), kronecker=kron
            )
        rates = {"kroneckers": options["lr"], "scales": options["lr"],
                 "weight_clips": options["clip_lr"], "act_clips": options["clip_lr"]}

        def freeze(name: str, q: PlaceQuantizers, plan: Plan) -> Transform:
            start = plan.transform if q.scale is None else q.scale.frozen()
            return _frozen_transform(start, q.kronecker, layer.index, name)

        return fit_and_freeze(layer, quantizers, rates, train_options(options, settings, layer, self.name), freeze)


def _frozen_transform(start: Transform, kron: LearnableKronecker, layer: int, place: str) -> Transform:
    """``start`` then the trained Kronecker as immutable atoms; a singular factor names the layer and place."""
    try:
        frozen = kron.freeze()
    except TransformError as err:
        raise TransformError(
            f"flatquant layer {layer}, place {place!r}: training left a Kronecker factor that cannot be "
            f"inverted reliably ({err}). Lower lr or train fewer epochs."
        ) from err
    return frozen if isinstance(start, Identity) else Compose([start, frozen])


@hookimpl
def quantcompose_strategies() -> Iterator[Strategy]:
    yield FlatQuant()


__all__ = ["FlatQuant", "INITS", "initial_factor", "kronecker_factors"]
