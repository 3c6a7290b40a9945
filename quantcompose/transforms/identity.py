"""The identity map: the neutral element of composition."""

from __future__ import annotations

from typing import Any

import torch

from quantcompose.transforms.base import Transform, check_size


class Identity(Transform):
    """``x ↦ x`` on a width-``size`` last dimension."""

    def __init__(self, size: int) -> None:
        self.size = check_size(size)
        self._freeze()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _make_inverse(self) -> Transform:
        return self

    @property
    def T(self) -> Transform:
        return self

    @property
    def is_orthogonal(self) -> bool:
        return True

    @property
    def is_diagonal(self) -> bool:
        return True

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Identity":
        return Identity(self.size)

    def state_dict(self) -> dict[str, Any]:
        return {"type": "Identity", "size": self.size}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "Identity":
        return cls(int(state["size"]))
