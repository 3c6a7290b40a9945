"""Diagonal scaling ``x ↦ x * factors`` (SmoothQuant-style channel migration)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from quantcompose.errors import TransformError
from quantcompose.transforms._util import as_float_tensor, format_indices
from quantcompose.transforms.base import Transform, cast_like


class Scale(Transform):
    """The diagonal map ``x·diag(factors)``; ``factors`` has shape ``(n,)``.

    A norm with weight ``g`` before the layer absorbs it exactly: ``g ← g·factors``.
    """

    factors: torch.Tensor

    def __init__(self, factors: torch.Tensor | Sequence[float]) -> None:
        f = as_float_tensor(factors, "Scale factors")
        if f.dim() != 1 or f.numel() == 0:
            raise TransformError(f"Scale factors must be a non-empty 1-D tensor, got shape {tuple(f.shape)}.")
        bad = (f == 0) | ~torch.isfinite(f)
        if bool(bad.any()):
            count = int(bad.sum())
            raise TransformError(
                f"Scale factors must be finite and nonzero for the map to be invertible, but {count} "
                f"of {f.numel()} are zero, NaN or inf (indices {format_indices(bad)}). "
                "Clamp them first, e.g. factors.nan_to_num(1.0).clamp(min=1e-5) for positive scales."
            )
        self.factors = f
        self.size = f.numel()
        self._freeze()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * cast_like(self.factors, x)

    def _make_inverse(self) -> "Scale":
        if self.factors.dtype in (torch.float16, torch.bfloat16):
            # 16-bit factors are a storage form (quantcompose.storage): the weight is folded
            # with this inverse, which must be exact for the rounded factors, not rounded again.
            return Scale(1.0 / self.factors.to(torch.float64))
        return Scale(1.0 / self.factors)

    @property
    def T(self) -> Transform:
        # A diagonal matrix is its own transpose.
        return self

    @property
    def is_orthogonal(self) -> bool:
        return bool((self.factors.abs() == 1).all())

    @property
    def is_diagonal(self) -> bool:
        return True

    def simplify(self) -> Transform:
        if bool((self.factors == 1).all()):
            from quantcompose.transforms.identity import Identity

            return Identity(self.size)
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Scale":
        return Scale(self.factors.to(device=device, dtype=dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"type": "Scale", "factors": self.factors}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "Scale":
        return cls(state["factors"])

    def __repr__(self) -> str:
        return f"Scale(size={self.size}, dtype={self.factors.dtype})"
