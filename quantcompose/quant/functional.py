"""Reference (pure PyTorch) quantize / dequantize / fake-quantize.

These are the ground truth that the fused kernels are tested against, so they
favour clarity and exactness over speed.

Layout of the quantization parameters returned by :func:`compute_qparams`
(always ``keepdim``-style so they broadcast):

* ``"tensor"``: shape ``(1, …, 1)`` (``x.dim()`` ones), broadcasts against ``x``;
* ``"token"`` / ``"channel"``: shape ``(..., 1)``, broadcasts against ``x``;
* ``"group"``: shape ``(..., n // group_size, 1)``, broadcasts against
  ``x.reshape(..., n // group_size, group_size)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantcompose.errors import CalibrationError, ShapeError
from quantcompose.quant.spec import QuantSpec

# Lower bound on the scale: an all-zero row would otherwise divide by zero.
SCALE_EPS = 1e-8


@dataclass
class QuantizedTensor:
    """Integer codes plus what is needed to map them back to real values.

    ``codes`` has the original shape ``shape`` and dtype ``spec.code_dtype``;
    ``scale`` / ``zero_point`` follow the layout in the module docstring
    (``zero_point`` is a float tensor holding integer values).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec
    shape: torch.Size


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision scales lose too much; keep float64 when the caller asked for it.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}; convert it with x.float().")
    if x.dim() == 0:
        raise ShapeError("cannot quantize a 0-dim tensor: give it at least one dimension (x.reshape(1)).")
    if x.numel() == 0:
        raise ShapeError(f"cannot quantize an empty tensor of shape {tuple(x.shape)}: it has no values.")


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` so that one scale covers the reduction over its last dim (or all of it)."""
    if spec.granularity != "group":
        return x
    n, g = x.shape[-1], spec.group_size
    assert g is not None  # guaranteed by QuantSpec
    if n % g != 0:
        raise ShapeError(
            f"last dimension {n} is not divisible by group_size {g}: "
            "choose a group size that divides the width."
        )
    return x.reshape(*x.shape[:-1], n // g, g)


def _reduce_min_max(xg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.granularity == "tensor":
        shape = (1,) * xg.dim()
        return xg.amin().reshape(shape), xg.amax().reshape(shape)
    return xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)


def compute_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ``x`` under ``spec`` (float32, or float64 for float64 input).

    The range always includes 0 (so 0 is exactly representable), then shrinks
    by ``spec.clip_ratio``. Raises :class:`ShapeError` for 0-dim / empty input or
    a group size that does not divide the last dim, and :class:`CalibrationError`
    when ``x`` holds NaN or inf.
    """
    _check_input(x)
    with torch.no_grad():
        xg = _grouped(x.detach().to(_compute_dtype(x)), spec)
        lo, hi = _reduce_min_max(xg, spec)
        return qparams_from_range(lo, hi, spec)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the unclipped range ``[lo, hi]`` (reduced min and max of the data).

    :func:`compute_qparams` is this after the reduction; searches over
    ``spec.clip_ratio`` call it directly to reduce the data once.
    """
    # min/max propagate NaN and inf, so checking them checks all of x at a fraction of the cost.
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise CalibrationError("input contains NaN/inf; check the calibration data or the preceding layer.")
    if spec.symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs()) * spec.clip_ratio
        scale = (absmax / spec.qmax).clamp_min(SCALE_EPS)
        zero = torch.zeros_like(scale)
    else:
        xmax = hi.clamp_min(0) * spec.clip_ratio
        xmin = lo.clamp_max(0) * spec.clip_ratio
        scale = ((xmax - xmin) / (spec.qmax - spec.qmin)).clamp_min(SCALE_EPS)
        zero = torch.round(-xmin / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero


def _float_codes(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    # torch.round is round-half-to-even, the convention the kernels follow. In-place
    # steps on the one fresh buffer torch.div returns: fewer passes over memory.
    return torch.div(xg, scale).round_().add_(zero).clamp_(spec.qmin, spec.qmax)


def fake_quantize_with(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``(codes − zero) · scale`` for given quantization parameters (``xg`` already grouped).

    Searches over ``spec.clip_ratio`` call it with parameters from
    :func:`qparams_from_range` so the data is reduced only once.
    """
    return _float_codes(xg, scale, zero, spec).sub_(zero).mul_(scale)


def quantize(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Integer codes ``clamp(round(x / scale) + zero, qmin, qmax)`` of dtype ``spec.code_dtype``."""
    scale, zero = compute_qparams(x, spec)
    with torch.no_grad():
        xg = _grouped(x.detach().to(scale.dtype), spec)
        codes = _float_codes(xg, scale, zero, spec).reshape(x.shape).to(spec.code_dtype)
    return QuantizedTensor(codes=codes, scale=scale, zero_point=zero, spec=spec, shape=x.shape)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real values ``(codes − zero) · scale``, of shape ``q.shape`` and dtype ``dtype``."""
    codes = _grouped(q.codes.to(q.scale.dtype), q.spec)
    return ((codes - q.zero_point) * q.scale).reshape(q.shape).to(dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, without integer casts.

    The gradient passes straight through (STE: d out / d x = 1), so learnable
    methods can train through it.
    """
    scale, zero = compute_qparams(x, spec)
    with torch.no_grad():
        xg = _grouped(x.detach().to(scale.dtype), spec)
        fq = fake_quantize_with(xg, scale, zero, spec).reshape(x.shape).to(x.dtype)
    # STE written as fq + (x − x.detach()) rather than x + (fq − x).detach():
    # x − x.detach() is exactly 0, so the forward value is bit-identical to fq
    # (the usual form can be off by one ulp), and the gradient is still 1.
    if x.requires_grad and torch.is_grad_enabled():
        return fq + (x - x.detach())
    return fq
