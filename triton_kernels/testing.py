"""Helpers to build transforms / data for kernel tests and benchmarks (pure PyTorch)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = [
    "block_sizes",
    "random_orthogonal_blocks",
    "hadamard_blocks",
    "dyadic_blocks",
    "dyadic_input",
    "dense_factors",
    "dense_transform",
    "apply_dense",
    "perm_matrix",
]


def block_sizes(n: int, b: int) -> list[int]:
    """``n`` split into blocks of ``b`` with a shorter last block (576, 128 → 4×128 + 64)."""
    return [b] * (n // b) + ([n % b] if n % b else [])


def random_orthogonal_blocks(sizes: Sequence[int], *, generator: Optional[torch.Generator] = None,
                             dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    out = []
    for s in sizes:
        q, r = torch.linalg.qr(torch.randn(s, s, dtype=torch.float64, generator=generator))
        out.append((q * torch.sign(torch.diagonal(r))).to(dtype))
    return out


def _hadamard(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != b:
        raise ValueError(f"Hadamard size {b} is not a power of two.")
    return h


def hadamard_blocks(sizes: Sequence[int], *, signs: Optional[torch.Tensor] = None,
                    dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Orthonormal (randomized) Hadamard blocks ``diag(signs_blk) · H_b / √b``.

    A Hadamard transform of block size ``b`` *is* a block rotation with these
    blocks, which is how the fused kernel supports it.
    """
    out, start = [], 0
    for s in sizes:
        h = _hadamard(s) / (s ** 0.5)
        if signs is not None:
            h = signs[start:start + s].to(torch.float64)[:, None] * h
        out.append(h.to(dtype))
        start += s
    return out


def dyadic_blocks(sizes: Sequence[int], *, generator: Optional[torch.Generator] = None,
                  density: float = 0.25) -> list[torch.Tensor]:
    """Sparse blocks with entries in {0, ±1/2, ±1}: every product / sum is exact in fp16 and fp32."""
    out = []
    for s in sizes:
        vals = torch.tensor([-1.0, -0.5, 0.5, 1.0])[torch.randint(0, 4, (s, s), generator=generator)]
        keep = torch.rand(s, s, generator=generator) < density
        out.append(torch.where(keep, vals, torch.zeros(())))
    return out


def dyadic_input(shape: Sequence[int], *, generator: Optional[torch.Generator] = None, levels: int = 4,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values ``k/4`` with ``|k| ≤ levels``: exact in fp16 / fp32."""
    k = torch.randint(-levels, levels + 1, tuple(shape), generator=generator)
    return (k.to(torch.float32) / 4).to(dtype)


def perm_matrix(perm: torch.Tensor) -> torch.Tensor:
    """``P`` with ``x @ P == x[..., perm]``: ``P[perm[c], c] = 1``."""
    n = perm.numel()
    p = torch.zeros(n, n, dtype=torch.float64)
    p[perm.long(), torch.arange(n)] = 1.0
    return p


def dense_factors(n: int, *, scale=None, rot1=None, perm=None, rot2=None) -> list[torch.Tensor]:
    """The dense float64 ``n×n`` factors ``[diag(scale), blockdiag(rot1), P, blockdiag(rot2)]`` present."""
    out = []
    if scale is not None:
        out.append(torch.diag(scale.to(torch.float64)))
    if rot1 is not None:
        out.append(torch.block_diag(*[b.to(torch.float64) for b in rot1]))
    if perm is not None:
        out.append(perm_matrix(perm))
    if rot2 is not None:
        out.append(torch.block_diag(*[b.to(torch.float64) for b in rot2]))
    return out


def dense_transform(n: int, **kw) -> torch.Tensor:
    """Dense float64 ``diag(scale) · blockdiag(rot1) · P · blockdiag(rot2)`` (``O(n³)``; keep n small)."""
    m = torch.eye(n, dtype=torch.float64)
    for f in dense_factors(n, **kw):
        m = m @ f
    return m


def apply_dense(x: torch.Tensor, **kw) -> torch.Tensor:
    """``x · T`` in float64 through the dense factors (``O(rows · n²)``)."""
    u = x.to(torch.float64)
    for f in dense_factors(x.shape[-1], **kw):
        u = u @ f
    return u
