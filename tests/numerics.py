"""Small numeric helpers shared by the transform tests: seeded generators, relative error, test matrices."""

from __future__ import annotations

import math

import torch

from quantcompose.transforms import random_orthogonal


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute error relative to the max magnitude of ``expected`` (both detached)."""
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max()) / max(float(expected.abs().max()), 1e-300)


def well_conditioned(n: int, g: torch.Generator) -> torch.Tensor:
    """``Q₁·diag(s)·Q₂`` (float64) with singular values ``s`` log-uniform in [0.5, 2]: condition number ≤ 4."""
    s = torch.empty(n, dtype=torch.float64).uniform_(math.log(0.5), math.log(2.0), generator=g).exp()
    return (random_orthogonal(n, g) * s) @ random_orthogonal(n, g)
