"""Learnable counterparts of the atoms, for layer-scope fitting (OmniQuant, FlatQuant-style).

These are ``torch.nn.Module`` s with differentiable ``forward`` and trainable
parameters, kept apart from the immutable atoms on purpose: a strategy's
``fit_layer`` trains them with gradients, then calls ``freeze()``, which
returns the ordinary float64 atom whose forward equals the module's. Only
the atom leaves the strategy, so folding, saving, the kernels and the 16-bit
exactness tests never see a learnable object.

* ``LearnableScale``: ``exp(log_factors)``, positive; freezes into :class:`Scale`.
* ``LearnableOrthogonal``: blocks ``base · Cayley(W)``, orthogonal for every
  ``W``; freezes into :class:`BlockRotation`.
* ``LearnableKronecker``: two free factors ``A``, ``B``; freezes into :class:`Kronecker`.
* ``LearnableShift``: a free per-channel shift; freezes into :class:`FrozenShift`,
  the bias folds that make it exact (a shift is affine, not a Transform).

Usage in a strategy's ``fit_layer`` (sketch)::

    scale, rot = LearnableScale(n, init=s0), LearnableOrthogonal(blocks=duquant_rotation.blocks)
    opt = torch.optim.Adam([*scale.parameters(), *rot.parameters()], lr=1e-3)
    for x, y in batches:                 # calibration inputs and full-precision outputs
        w = rot.fold_into_weight(scale.fold_into_weight(weight))      # W·T⁻ᵀ, differentiable
        loss = mse(F.linear(fake_quantize(rot(scale(x)), spec), w), y)
        opt.zero_grad(); loss.backward(); opt.step()
    transform = scale.freeze() @ rot.freeze()   # ordinary atoms: the plan's transform

Each module's ``fold_into_weight(W)`` is the differentiable ``W·T⁻ᵀ`` of
:meth:`Transform.fold_into_weight`, so a layer fed ``module(x)`` with it
computes what ``W`` did on ``x`` at every step of the fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from quantcompose.errors import ShapeError, TransformError
from quantcompose.transforms.base import check_size
from quantcompose.transforms.kronecker import Kronecker, kronecker_apply
from quantcompose.transforms.rotation import BlockRotation, _segments
from quantcompose.transforms.scale import Scale


def _check_input(module: nn.Module, x: torch.Tensor, width: int) -> None:
    if x.dim() == 0 or x.shape[-1] != width:
        raise ShapeError(
            f"{type(module).__name__} of width {width} got an input of shape {tuple(x.shape)}; "
            f"it acts on the last dimension, which must have size {width}."
        )


def _initial_vector(init: torch.Tensor | Sequence[float] | None, width: int, what: str, default: float) -> torch.Tensor:
    if init is None:
        return torch.full((width,), default, dtype=torch.float64)
    t = torch.as_tensor(init, dtype=torch.float64).detach().clone()
    if t.shape != (width,):
        raise TransformError(f"{what} must have shape ({width},), got {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise TransformError(f"{what} must be finite; replace NaN / inf entries first (e.g. nan_to_num).")
    return t


class LearnableScale(nn.Module):
    """A positive per-channel scale ``x·diag(exp(log_factors))``; freezes into :class:`Scale`.

    Learning the logarithm keeps every factor positive (so the map stays
    invertible) and makes steps relative, as for OmniQuant's and SmoothQuant's
    migration strengths. ``init`` gives positive starting factors (default: ones).
    """

    def __init__(
        self, width: int, init: torch.Tensor | Sequence[float] | None = None, *, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.width = check_size(width)
        start = _initial_vector(init, self.width, "LearnableScale init", 1.0)
        if not bool((start > 0).all()):
            raise TransformError(
                f"LearnableScale init must be positive (it is learned as a logarithm), but "
                f"{int((start <= 0).sum())} of {self.width} factors are not; pass their absolute values "
                "and put the signs in a separate Scale."
            )
        self.log_factors = nn.Parameter(torch.log(start).to(dtype))

    def factors(self) -> torch.Tensor:
        """The current factors ``exp(log_factors)`` (differentiable)."""
        return torch.exp(self.log_factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x, self.width)
        return x * self.factors().to(x.dtype)

    def fold_into_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W·diag(factors)⁻¹`` for a consumer weight ``(out, width)`` (differentiable)."""
        _check_input(self, weight, self.width)
        return weight / self.factors().to(weight.dtype)

    def freeze(self) -> Scale:
        """The current map as a float64 :class:`Scale` (detached)."""
        return Scale(torch.exp(self.log_factors.detach().to(torch.float64)))


def _cayley(w: torch.Tensor) -> torch.Tensor:
    """``(I − S)⁻¹(I + S)`` with ``S = W − Wᵀ``, batched over leading dims: orthogonal for every ``W``.

    ``S`` is skew-symmetric, so ``I − S`` is always invertible and the result
    is orthogonal with determinant 1; ``W = 0`` gives the identity.
    """
    s = w - w.transpose(-1, -2)
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device).expand_as(s)
    return torch.linalg.solve(eye - s, eye + s)


class LearnableOrthogonal(nn.Module):
    """A block-diagonal orthogonal map, orthogonal by construction; freezes into :class:`BlockRotation`.

    Each block is ``base_k · Cayley(W_k)`` with a fixed orthogonal ``base_k``
    (the starting rotation, e.g. DuQuant's greedy blocks) and a free parameter
    ``W_k`` initialised to zero. Why the Cayley transform rather than
    ``torch.nn.utils.parametrizations.orthogonal``: every value of ``W_k`` gives
    an exactly orthogonal block, so any optimizer works without a projection
    or retraction step (Wen & Yin, Math. Program. 142, 2013, use the same map);
    it is the identity at zero, so training starts from any given rotation;
    and ``freeze`` re-evaluates the same closed form in float64, so the frozen
    blocks are orthogonal to float64 rounding whatever dtype was trained in
    (``torch``'s parametrization evaluates its weight in the parameter's dtype,
    so a float32 fit would freeze into blocks orthogonal only to float32
    rounding). Cayley maps reach every rotation without eigenvalue −1
    relative to the base, which covers the neighbourhood a refinement explores.

    Build it from a width (``size`` with blocks of ``block_size``, the last one
    shorter, starting at the identity) or from starting ``blocks`` (square
    orthogonal matrices, validated as a :class:`BlockRotation`). 1×1 blocks
    have nothing to learn (they are ±1) and get no parameter.
    """

    def __init__(
        self,
        size: int | None = None,
        block_size: int | None = None,
        *,
        blocks: Sequence[torch.Tensor] | BlockRotation | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if (size is None) == (blocks is None):
            raise TransformError("LearnableOrthogonal takes either size (with an optional block_size) or blocks, not both.")
        if blocks is None:
            size = check_size(size)
            block = size if block_size is None else check_size(block_size)
            start = BlockRotation.uniform(torch.eye(min(block, size), dtype=torch.float64), size)
        else:
            start = blocks if isinstance(blocks, BlockRotation) else BlockRotation(blocks)
        self.width = start.size
        runs = _segments(start.blocks)
        self._runs = [(seg.start, seg.count, seg.block) for seg in runs]
        self.skews = nn.ParameterList()
        self._skew_of_run: list[int | None] = []
        for i, seg in enumerate(runs):
            # Fixed bases are buffers, so .to() moves them and optimizers never see them;
            # float64, so that freeze() starts from the exact starting rotation.
            self.register_buffer(f"base{i}", seg.matrix.to(torch.float64).expand(seg.count, seg.block, seg.block).clone())
            if seg.block > 1:
                self._skew_of_run.append(len(self.skews))
                self.skews.append(nn.Parameter(torch.zeros(seg.count, seg.block, seg.block, dtype=dtype)))
            else:
                self._skew_of_run.append(None)

    def _blocks(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each run's stacked orthogonal blocks ``(count, b, b)``, computed in ``dtype`` (differentiable)."""
        out = []
        for i, k in enumerate(self._skew_of_run):
            base = getattr(self, f"base{i}").to(dtype)
            out.append(base if k is None else base @ _cayley(self.skews[k].to(dtype)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x, self.width)
        outs = []
        for (start, count, b), blocks in zip(self._runs, self._blocks(x.dtype)):
            xs = x[..., start : start + count * b].reshape(*x.shape[:-1], count, b)
            ys = torch.einsum("...kb,kbc->...kc", xs, blocks)
            outs.append(ys.reshape(*x.shape[:-1], count * b))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def fold_into_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W·R⁻ᵀ = W·R`` for a consumer weight ``(out, width)`` (differentiable; ``R`` is orthogonal)."""
        return self.forward(weight)

    def freeze(self) -> BlockRotation:
        """The current map as a float64 :class:`BlockRotation` (detached, validated orthogonal)."""
        with torch.no_grad():
            blocks = [b.clone() for run in self._blocks(torch.float64) for b in run]
        return BlockRotation(blocks)


class LearnableKronecker(nn.Module):
    """``x·(A ⊗ B)`` with two free factors (``m×m`` and ``n×n``); freezes into :class:`Kronecker`.

    ``A`` and ``B`` start at the identity or at the given matrices (validated
    invertible by building a :class:`Kronecker` from them). Training does
    not constrain them; ``freeze`` raises :class:`TransformError` if a fit
    has made a factor singular or ill-conditioned.
    """

    def __init__(
        self,
        m: int,
        n: int,
        A: torch.Tensor | None = None,
        B: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        m, n = check_size(m), check_size(n)
        a = torch.eye(m, dtype=torch.float64) if A is None else A
        b = torch.eye(n, dtype=torch.float64) if B is None else B
        start = Kronecker(a, b)
        if start.factor_sizes != (m, n):
            raise TransformError(
                f"LearnableKronecker({m}, {n}) needs a {m}×{m} A and an {n}×{n} B, "
                f"got {tuple(start.A.shape)} and {tuple(start.B.shape)}."
            )
        self.width = m * n
        self.A = nn.Parameter(start.A.to(dtype).clone())
        self.B = nn.Parameter(start.B.to(dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x, self.width)
        return kronecker_apply(x, self.A.to(x.dtype), self.B.to(x.dtype))

    def fold_into_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W·(A ⊗ B)⁻ᵀ = W·(A⁻ᵀ ⊗ B⁻ᵀ)`` for a consumer weight ``(out, m·n)`` (differentiable)."""
        _check_input(self, weight, self.width)
        a, b = self.A.to(weight.dtype), self.B.to(weight.dtype)
        return kronecker_apply(weight, torch.linalg.inv(a).T, torch.linalg.inv(b).T)

    def freeze(self) -> Kronecker:
        """The current map as a float64 :class:`Kronecker` (detached, validated invertible)."""
        return Kronecker(self.A.detach().to(torch.float64), self.B.detach().to(torch.float64))


@dataclass(frozen=True)
class FrozenShift:
    """A fixed per-channel shift ``x ↦ x − shift`` and the bias folds that make it exact.

    A shift is affine, not linear, so it is no :class:`Transform`: it cannot
    compose into a plan's ``T``. A strategy uses it in two folds around the
    place it shifts (OmniQuant's channel-wise shifting, Shao et al., 2024):

    * the **producer** emits the shifted activation: its bias ``β`` becomes
      ``producer_bias(β) = β − shift`` (a LayerNorm's bias, or the bias of a
      linear that writes the activation). An RMSNorm has no bias, so on Llama
      the shift would run online before ``T``.
    * every **consumer** linear ``y = x·Wᵀ + b`` now reads ``x − shift`` and
      restores its output with ``b' = b + shift·Wᵀ`` (``consumer_bias``), since
      ``(x − shift)·Wᵀ + b + shift·Wᵀ = x·Wᵀ + b``.

    With a transform ``T`` after the shift, ``W`` here is the weight *before*
    ``T`` is folded; for the folded ``W' = W·T⁻ᵀ`` pass the shifted vector
    through ``T`` first, since ``shift·Wᵀ = (shift·T)·W'ᵀ``.
    """

    shift: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x − shift`` (the activation the producer now emits)."""
        return x - self.shift.to(dtype=x.dtype, device=x.device)

    def bias_correction(self, weight: torch.Tensor) -> torch.Tensor:
        """``shift·Wᵀ`` (shape ``(out,)``, float64): what a consumer with weight ``W`` ``(out, in)`` adds to its bias."""
        if weight.dim() != 2 or weight.shape[1] != self.shift.numel():
            raise ShapeError(
                f"FrozenShift of width {self.shift.numel()} needs a consumer weight (out, {self.shift.numel()}), "
                f"got shape {tuple(weight.shape)}."
            )
        return self.shift.to(device=weight.device) @ weight.to(torch.float64).T

    def consumer_bias(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``b + shift·Wᵀ`` in the bias's dtype (the weight's when there is no bias yet)."""
        correction = self.bias_correction(weight)
        if bias is None:
            return correction.to(weight.dtype)
        return (bias.to(torch.float64) + correction).to(bias.dtype)

    def producer_bias(self, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``β − shift`` in ``β``'s dtype (``dtype``, default float32, when the producer has no bias yet)."""
        if bias is None:
            return (-self.shift).to(dtype or torch.float32)
        return (bias.to(torch.float64) - self.shift.to(bias.device)).to(bias.dtype)


class LearnableShift(nn.Module):
    """A per-channel shift ``x ↦ x − shift`` (zero at the start, or ``init``); freezes into :class:`FrozenShift`.

    Not a linear map: ``freeze()`` returns the shift with the bias folds a
    strategy applies to the producer and consumers of the shifted place
    (see :class:`FrozenShift` for the algebra and its sign).
    """

    def __init__(
        self, width: int, init: torch.Tensor | Sequence[float] | None = None, *, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.width = check_size(width)
        self.shift = nn.Parameter(_initial_vector(init, self.width, "LearnableShift init", 0.0).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x, self.width)
        return x - self.shift.to(x.dtype)

    def freeze(self) -> FrozenShift:
        """The current shift, detached, in float64."""
        return FrozenShift(self.shift.detach().to(torch.float64).clone())
