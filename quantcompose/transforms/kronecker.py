"""The Kronecker-product map ``x ↦ x·(A ⊗ B)`` (FlatQuant-style affine transforms).

Meaning of ``X``: an input ``x`` of width ``m·n`` is viewed row-major as the
``m×n`` matrix ``X`` with ``X[i, j] = x[i·n + j]``. The map is
``X ↦ Aᵀ·X·B``, and in the library's row-vector convention that is exactly

    ``Kronecker(A, B).matrix() == torch.kron(A, B)``

because ``(Aᵀ·X·B)[k, l] = Σ_ij A[i, k]·X[i, j]·B[j, l]`` and
``kron(A, B)[i·n + j, k·n + l] = A[i, k]·B[j, l]``. It costs ``O(mn(m + n))``
per row (two small matmuls) instead of ``O(m²n²)`` for the dense matrix,
which is never formed. FlatQuant (Sun et al., 2024) learns such a pair of
small invertible factors per linear layer for this reason.
"""

from __future__ import annotations

from typing import Any

import torch

from quantcompose.errors import TransformError
from quantcompose.transforms._util import as_float_tensor, orthogonality_tolerance
from quantcompose.transforms.base import Transform, cast_like

#: Condition numbers (2-norm, computed in float64) above this are rejected in float64 storage.
MAX_CONDITION_FLOAT64 = 1e8


def max_condition(dtype: torch.dtype) -> float:
    """The largest condition number a factor stored in ``dtype`` may have.

    ``min(1e8, 1/eps)``: beyond ``1/eps`` the inverse has no correct digit
    in that dtype (the factor is singular to working precision); in float64
    the limit is 1e8, so that a round trip keeps about eight digits.
    """
    return min(MAX_CONDITION_FLOAT64, 1.0 / torch.finfo(dtype).eps)


def kronecker_orthogonality_tolerance(size: int, dtype: torch.dtype) -> float:
    """Max ``|F·Fᵀ − I|`` entry for a ``size×size`` factor in ``dtype`` to count as orthogonal.

    ``16·size·eps``: the rounding a truly orthogonal matrix picks up when it is
    computed or stored in ``dtype``, and no more; never looser than
    :func:`orthogonality_tolerance`, which a ``BlockRotation`` must meet. An
    orthogonal Kronecker inverts by transposition, so a looser tolerance would
    turn near-orthogonal factors into an inexact inverse.
    """
    return min(16 * size * torch.finfo(dtype).eps, orthogonality_tolerance(dtype))


def kronecker_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ kron(a, b)`` without forming it: ``x`` viewed as ``(…, m, n)`` maps to ``aᵀ·X·b``.

    Differentiable in ``x``, ``a`` and ``b`` (``LearnableKronecker`` uses it);
    the factors must already have ``x``'s dtype and device.
    """
    m, n = a.shape[0], b.shape[0]
    rows = x.numel() // (m * n)  # explicit, not -1: an empty batch must reshape too
    xb = x.reshape(rows, m, n) @ b
    # Aᵀ·(X·B) as ((X·B)ᵀ·A)ᵀ: one batched GEMM with the small factor on the right.
    y = (xb.transpose(-1, -2) @ a).transpose(-1, -2)
    return y.reshape(x.shape)


def _factor(value: Any, name: str) -> torch.Tensor:
    t = as_float_tensor(value, f"Kronecker factor {name}")
    if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] == 0:
        raise TransformError(
            f"Kronecker factor {name} must be a non-empty square matrix, got shape {tuple(t.shape)}. "
            f"For a width m·n map pass an m×m A and an n×n B."
        )
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise TransformError(
            f"Kronecker factor {name} has {bad} NaN or infinite entries of {t.numel()}; "
            "a map with them is not invertible. Check what produced it (a diverged fit?)."
        )
    return t


def _check_condition(t: torch.Tensor, name: str) -> None:
    limit = max_condition(t.dtype)
    cond = float(torch.linalg.cond(t.to(torch.float64)))
    if not cond <= limit:  # NaN (a zero matrix) fails too
        raise TransformError(
            f"Kronecker factor {name} ({t.shape[0]}×{t.shape[0]}, {t.dtype}) is singular or "
            f"ill-conditioned: condition number {cond:.3g} exceeds {limit:.3g} (min(1e8, 1/eps) "
            "for its dtype). Regularize it (e.g. add a multiple of the identity) or store it in float64."
        )


def _is_orthogonal(t: torch.Tensor) -> bool:
    t64 = t.to(torch.float64)
    err = float((t64 @ t64.T - torch.eye(t.shape[0], dtype=torch.float64, device=t.device)).abs().max())
    return err <= kronecker_orthogonality_tolerance(t.shape[0], t.dtype)


class Kronecker(Transform):
    """``x·(A ⊗ B)``: ``x`` viewed as ``(…, m, n)`` row-major maps to ``Aᵀ·X·B``.

    ``A`` is ``m×m``, ``B`` is ``n×n``, both invertible; the width is ``m·n``
    and ``matrix() == torch.kron(A, B)``. The inverse is
    ``Kronecker(A⁻¹, B⁻¹)`` (factors inverted in float64, stored in the
    factors' dtype) and the transpose ``Kronecker(Aᵀ, Bᵀ)``. When both
    factors are orthogonal (to :func:`kronecker_orthogonality_tolerance`,
    ``16·size·eps`` of their dtype, checked once here) ``is_orthogonal`` is
    True and the inverse is the transpose.

    Raises :class:`TransformError` for non-square, empty, NaN / infinite or
    ill-conditioned factors (condition number over :func:`max_condition`:
    1e8 in float64, ``1/eps`` below), and for factors on different devices.
    """

    A: torch.Tensor
    B: torch.Tensor

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        a, b = _factor(A, "A"), _factor(B, "B")
        if a.device != b.device:
            raise TransformError(
                f"Kronecker factors must be on one device, got A on {a.device} and B on {b.device}; "
                "move one with .to(device)."
            )
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
        _check_condition(a, "A")
        _check_condition(b, "B")
        self._init(a, b, _is_orthogonal(a) and _is_orthogonal(b))

    def _init(self, a: torch.Tensor, b: torch.Tensor, orthogonal: bool) -> None:
        self.A = a
        self.B = b
        self.size = a.shape[0] * b.shape[0]
        self._orthogonal = orthogonal
        self._freeze()

    @classmethod
    def _trusted(cls, a: torch.Tensor, b: torch.Tensor, orthogonal: bool) -> "Kronecker":
        """Build from factors already known to be valid (an inverse, transpose or moved copy)."""
        obj = cls.__new__(cls)
        obj._init(a.contiguous(), b.contiguous(), orthogonal)
        return obj

    @classmethod
    def identity(cls, m: int, n: int, dtype: torch.dtype = torch.float64) -> "Kronecker":
        """``Kronecker(I_m, I_n)``: the starting point of a learned pair."""
        return cls._trusted(torch.eye(m, dtype=dtype), torch.eye(n, dtype=dtype), True)

    @property
    def factor_sizes(self) -> tuple[int, int]:
        """``(m, n)``: the shape an input row is viewed as."""
        return self.A.shape[0], self.B.shape[0]

    # ------------------------------------------------------------------ application
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return kronecker_apply(x, cast_like(self.A, x), cast_like(self.B, x))

    def _make_inverse(self) -> "Kronecker":
        if self._orthogonal:
            return self._make_transpose()
        # Inverted in float64 and stored back in the factors' dtype: the most
        # accurate inverse that dtype can hold. Same condition number, so trusted.
        inv_a = torch.linalg.inv(self.A.to(torch.float64)).to(self.A.dtype)
        inv_b = torch.linalg.inv(self.B.to(torch.float64)).to(self.B.dtype)
        return Kronecker._trusted(inv_a, inv_b, False)

    def _make_transpose(self) -> "Kronecker":
        # (A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ
        return Kronecker._trusted(self.A.T, self.B.T, self._orthogonal)

    @property
    def is_orthogonal(self) -> bool:
        return self._orthogonal

    @property
    def is_diagonal(self) -> bool:
        # With invertible factors, A ⊗ B is diagonal exactly when A and B both are.
        return all(bool((f == torch.diag(torch.diagonal(f))).all()) for f in (self.A, self.B))

    def simplify(self) -> Transform:
        if all(bool(torch.equal(f, torch.eye(f.shape[0], dtype=f.dtype, device=f.device))) for f in (self.A, self.B)):
            from quantcompose.transforms.identity import Identity

            return Identity(self.size)
        return self

    # ------------------------------------------------------------------ conversion and state
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Kronecker":
        a, b = self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype)
        if dtype is None or dtype == self.A.dtype:
            return Kronecker._trusted(a, b, self._orthogonal)  # same values, only moved
        # Re-validate: a lower precision may make a factor singular to working precision.
        return Kronecker(a, b)

    def state_dict(self) -> dict[str, Any]:
        return {"type": "Kronecker", "A": self.A, "B": self.B}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "Kronecker":
        return cls(state["A"], state["B"])

    def __repr__(self) -> str:
        m, n = self.factor_sizes
        kind = ", orthogonal" if self._orthogonal else ""
        return f"Kronecker(size={self.size}, {m}×{n}{kind}, dtype={self.A.dtype})"
