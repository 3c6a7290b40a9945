"""Differentiable fake quantizers with learnable clipping, and their frozen form.

Training a quantizer needs gradients where the reference fake quantizer
(:func:`quantcompose.quant.fake_quantize`) has none: to the clipping bounds,
through the scale and zero point they set. Rounding is passed straight
through (``round_ste``), but the scale and the zero point are computed from
the (clipped) range with ordinary autograd, so a clip parameter feels both
the rounding error it causes and the clamping it does — the estimator of
OmniQuant's learnable weight clipping (Shao et al., ICLR 2024, Sec. 3.2).

The range rule is the library's (:func:`quantcompose.quant.functional.qparams_from_range`):
``[min(x, 0), max(x, 0)]`` per row (or group), each end shrunk by its own
ratio. Freezing the learned ratios and clamping the weight with
:func:`clamp_to_bounds` therefore reproduces, with ``clip_ratio=1``, the very
grid the trainer used.
"""

from __future__ import annotations

import torch
from torch import nn

from quantcompose.errors import ShapeError
from quantcompose.quant.functional import SCALE_EPS
from quantcompose.quant.spec import QuantSpec

#: Initial clip logit: sigmoid(4) ≈ 0.982, OmniQuant's initialization of its LWC bounds.
INIT_LOGIT = 4.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return (x.round() - x).detach() + x


def fake_quantize_range(xg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``(codes − zero)·scale`` of ``xg`` for the already clipped range ``[lo, hi]``, differentiably.

    ``lo <= 0 <= hi`` broadcast against ``xg`` (reduced over its last dim).
    Gradients reach ``xg`` (straight through the rounding, zero where it is
    clamped) and ``lo`` / ``hi`` through the scale and zero point.
    """
    if spec.symmetric:
        scale = (torch.maximum(-lo, hi) / spec.qmax).clamp_min(SCALE_EPS)
        zero = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(SCALE_EPS)
        zero = round_ste(-lo / scale).clamp(spec.qmin, spec.qmax)
    codes = (round_ste(xg / scale) + zero).clamp(spec.qmin, spec.qmax)
    return (codes - zero) * scale


def _row_range(xg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.granularity == "tensor":
        shape = (1,) * xg.dim()
        return xg.amin().reshape(shape).clamp_max(0), xg.amax().reshape(shape).clamp_min(0)
    return xg.amin(dim=-1, keepdim=True).clamp_max(0), xg.amax(dim=-1, keepdim=True).clamp_min(0)


def _groups(spec: QuantSpec, width: int) -> int:
    if spec.granularity == "group":
        if width % spec.group_size:
            raise ShapeError(f"weight width {width} is not divisible by group_size {spec.group_size}")
        return width // spec.group_size
    if spec.granularity == "channel":
        return 1
    raise ShapeError(f"learnable weight clipping works per channel or group, not {spec.granularity!r}")


def ratio_logits(ratios: torch.Tensor, cap: float = INIT_LOGIT) -> torch.Tensor:
    """The logits whose sigmoids are ``ratios`` in (0, 1], capped at ``cap``.

    A ratio of 1 (no clipping) has no finite logit, and near it the sigmoid is
    too flat to learn from: the cap is where training starts instead
    (``sigmoid(INIT_LOGIT) ≈ 0.982``, OmniQuant's initialization).
    """
    return torch.logit(ratios.detach().double().clamp(1e-6, 1.0)).clamp(max=cap).float()


class LearnableWeightClip(nn.Module):
    """OmniQuant's LWC for one (stacked) weight of shape ``(rows, width)``.

    Per row (and group, for a per-group ``spec``) a lower and an upper ratio
    ``sigmoid(beta)``, ``sigmoid(gamma)`` shrink the range to
    ``[sigmoid(beta)·min, sigmoid(gamma)·max]`` before the scale is set.
    """

    def __init__(self, rows: int, width: int, spec: QuantSpec, init_logit: float = INIT_LOGIT) -> None:
        super().__init__()
        self.spec = spec
        self.width = width
        groups = _groups(spec, width)
        self.beta = nn.Parameter(torch.full((rows, groups, 1), float(init_logit)))
        self.gamma = nn.Parameter(torch.full((rows, groups, 1), float(init_logit)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The fake-quantized ``weight`` under the current bounds."""
        if weight.shape != (self.beta.shape[0], self.width):
            raise ShapeError(f"weight of shape {tuple(weight.shape)} does not fit an LWC of "
                             f"{self.beta.shape[0]} rows × {self.width}")
        wg = weight.reshape(weight.shape[0], self.beta.shape[1], -1)
        lo, hi = _row_range(wg, self.spec)
        lo, hi = lo * torch.sigmoid(self.beta), hi * torch.sigmoid(self.gamma)
        # Clamp first, as the frozen form (clamp_to_bounds) does: for a symmetric
        # grid the two bounds differ and the shorter side clips inside the grid.
        clamped = torch.maximum(torch.minimum(wg, hi), lo)
        return fake_quantize_range(clamped, lo, hi, self.spec).reshape(weight.shape)

    def start_at(self, bounds: torch.Tensor, cap: float = INIT_LOGIT) -> None:
        """Start at ``bounds``, ``(rows, groups, 2)`` (lower, upper) ratios as :meth:`frozen_bounds` gives them.

        Each ratio becomes its logit, capped as :func:`ratio_logits` does.
        """
        if bounds.shape != (*self.beta.shape[:2], 2):
            raise ShapeError(f"clip bounds of shape {tuple(bounds.shape)} do not fit an LWC of "
                             f"{self.beta.shape[0]} rows × {self.beta.shape[1]} group(s)")
        logits = ratio_logits(bounds.to(self.beta.device), cap)
        with torch.no_grad():
            self.beta.copy_(logits[..., :1])
            self.gamma.copy_(logits[..., 1:])

    def frozen_bounds(self) -> torch.Tensor:
        """The learned ratios as a fixed ``(rows, groups, 2)`` tensor of (lower, upper) clips, detached."""
        with torch.no_grad():
            return torch.cat([torch.sigmoid(self.beta), torch.sigmoid(self.gamma)], dim=-1).float().clone()


class LearnableActClip(nn.Module):
    """Per-token activation fake quantization with one learnable clip ratio for the whole place."""

    def __init__(self, spec: QuantSpec, init_logit: float = INIT_LOGIT) -> None:
        super().__init__()
        if spec.granularity != "token":
            raise ShapeError(f"learnable activation clipping works per token, not {spec.granularity!r}")
        self.spec = spec
        self.logit = nn.Parameter(torch.tensor(float(init_logit)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ratio = torch.sigmoid(self.logit)
        lo, hi = _row_range(x, self.spec)
        return fake_quantize_range(x, lo * ratio, hi * ratio, self.spec)

    def start_at(self, ratio: float, cap: float = INIT_LOGIT) -> None:
        """Start the clip at ``ratio`` in (0, 1], as :func:`ratio_logits` caps it."""
        with torch.no_grad():
            self.logit.copy_(ratio_logits(torch.tensor(float(ratio)), cap))

    def frozen_ratio(self) -> float:
        """The learned ratio, a plain float in (0, 1) for the place's ``act_spec.clip_ratio``."""
        return float(torch.sigmoid(self.logit.detach()))


def clamp_to_bounds(weight: torch.Tensor, bounds: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight`` clamped so that quantizing it with ``clip_ratio=1`` uses the frozen LWC grid.

    ``bounds`` is ``(rows, groups, 2)`` (lower, upper) ratios as
    :meth:`LearnableWeightClip.frozen_bounds` returns; one group for a
    per-channel ``spec``.
    """
    groups = _groups(spec, weight.shape[1])
    if bounds.shape != (weight.shape[0], groups, 2):
        raise ShapeError(
            f"weight clip bounds of shape {tuple(bounds.shape)} do not fit a weight of {weight.shape[0]} rows "
            f"and {groups} group(s) per row: expected ({weight.shape[0]}, {groups}, 2)"
        )
    wg = weight.reshape(weight.shape[0], groups, -1)
    b = bounds.to(weight.device, weight.dtype)
    lo, hi = _row_range(wg, spec)
    return torch.maximum(torch.minimum(wg, hi * b[..., 1:]), lo * b[..., :1]).reshape(weight.shape)


__all__ = [
    "INIT_LOGIT",
    "LearnableActClip",
    "LearnableWeightClip",
    "clamp_to_bounds",
    "fake_quantize_range",
    "ratio_logits",
    "round_ste",
]
