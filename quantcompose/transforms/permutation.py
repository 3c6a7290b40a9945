"""Channel permutation ``x ↦ x[..., indices]`` (DuQuant's zigzag reordering)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from quantcompose.errors import ShapeError, TransformError
from quantcompose.transforms._util import format_indices
from quantcompose.transforms.base import Transform


class Permutation(Transform):
    """``forward(x) = x[..., indices]``; stored as an int64 index tensor, never densely."""

    indices: torch.Tensor

    def __init__(self, indices: torch.Tensor | Sequence[int]) -> None:
        idx = self._validated(indices)
        self.indices = idx
        self.size = idx.numel()
        self._freeze()

    @staticmethod
    def _validated(indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        if isinstance(indices, torch.Tensor):
            if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
                raise TransformError(f"Permutation indices must be integers, got a {indices.dtype} tensor.")
            idx = indices.detach().to(torch.int64).clone(memory_format=torch.contiguous_format)
        else:
            try:
                idx = torch.as_tensor(list(indices), dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TransformError(f"Permutation indices must be a sequence of ints: {exc}") from exc
        if idx.dim() != 1 or idx.numel() == 0:
            raise TransformError(f"Permutation indices must be a non-empty 1-D tensor, got shape {tuple(idx.shape)}.")
        n = idx.numel()
        # bincount over the in-range values finds both duplicates and gaps in O(n).
        out_of_range = (idx < 0) | (idx >= n)
        if bool(out_of_range.any()):
            raise TransformError(
                f"Permutation indices must lie in 0..{n - 1}; {int(out_of_range.sum())} do not "
                f"(positions {format_indices(out_of_range)})."
            )
        counts = torch.bincount(idx.cpu(), minlength=n)
        if bool((counts != 1).any()):
            raise TransformError(
                f"Permutation indices are not a permutation of 0..{n - 1}: missing "
                f"{format_indices(counts == 0)}, repeated {format_indices(counts > 1)}."
            )
        return idx

    @classmethod
    def _trusted(cls, idx: torch.Tensor) -> "Permutation":
        """Build from indices known to be a valid permutation (skips the O(n) check)."""
        obj = cls.__new__(cls)
        obj.indices = idx
        obj.size = idx.numel()
        obj._freeze()
        return obj

    @classmethod
    def random(cls, size: int, generator: torch.Generator | None = None) -> "Permutation":
        """A uniformly random permutation of ``size`` channels."""
        return cls._trusted(torch.randperm(size, generator=generator))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # gather with a broadcast (stride-0) index, not index_select(-1): the same
        # result, 8-20x faster on the CPU for activations of 576-1536 channels.
        return torch.gather(x, -1, self.indices.to(x.device).expand(x.shape))

    def _make_inverse(self) -> "Permutation":
        return Permutation._trusted(torch.argsort(self.indices))

    @property
    def is_orthogonal(self) -> bool:
        return True

    @property
    def is_diagonal(self) -> bool:
        return bool((self.indices == torch.arange(self.size, device=self.indices.device)).all())

    def __matmul__(self, other: Transform) -> Transform:
        # x[..., p][..., q] == x[..., p[q]]: two permutations compose into one.
        if isinstance(other, Permutation):
            if other.size != self.size:
                raise ShapeError(f"Cannot compose a Permutation of width {self.size} with one of width {other.size}.")
            return Permutation._trusted(self.indices[other.indices.to(self.indices.device)])
        return super().__matmul__(other)

    def simplify(self) -> Transform:
        if self.is_diagonal:
            from quantcompose.transforms.identity import Identity

            return Identity(self.size)
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Permutation":
        # Indices stay int64 whatever dtype is asked for: they index, they are not values.
        return Permutation._trusted(self.indices.to(device=device))

    def state_dict(self) -> dict[str, Any]:
        return {"type": "Permutation", "indices": self.indices}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "Permutation":
        return cls(state["indices"])
