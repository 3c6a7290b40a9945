"""LET's learnable channel-wise scale (OmniQuant, Shao et al., ICLR 2024, Sec. 3.3), frozen into a ``Scale``.

The place computes ``(x·diag(1/s))·(W·diag(s))ᵀ = x·Wᵀ`` for any positive
``s``, so the scale only moves quantization difficulty between the two sides;
training picks the ``s`` whose quantized product is closest to the
full-precision layer. ``s`` is kept as ``log s`` so it stays positive.
"""

from __future__ import annotations

import torch
from torch import nn

from quantcompose.errors import ShapeError
from quantcompose.transforms import Scale


class LearnableScale(nn.Module):
    """``x ↦ x·diag(1/s)`` on a place's input and ``W ↦ W·diag(s)`` on its weights, ``s`` learnable."""

    def __init__(self, transform: Scale) -> None:
        super().__init__()
        if not isinstance(transform, Scale):
            raise ShapeError(f"a learnable scale starts from a Scale transform, got {type(transform).__name__}")
        factors = transform.factors.detach().double()
        if bool((factors <= 0).any()):
            raise ShapeError("a learnable scale starts from positive factors (x·diag(1/s) with s > 0)")
        self.log_s = nn.Parameter((-factors.log()).float())  # the Scale holds 1/s

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.exp(-self.log_s)

    def on_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * torch.exp(self.log_s)

    def frozen(self) -> Scale:
        """The learned map as an ordinary ``Scale(1/s)`` atom, in float64."""
        return Scale(torch.exp(-self.log_s.detach().double()))


__all__ = ["LearnableScale"]
