"""A Hadamard rotation where one exists, and a documented orthogonal substitute where none does.

No Hadamard matrix exists for an order above 2 that is not a multiple of 4
(the rows of a ±1 matrix with orthogonal rows agree on exactly half their
entries, pairwise and in triples), so 9 or 14 attention heads cannot get
one; some multiples of 4 have no construction here either. ``hadamard_like``
then returns, in order of preference:

1. ``"block"``: a block-diagonal Hadamard, ``BlockRotation`` of ``n / b``
   blocks ``H_b/√b`` with ``b`` the largest supported size that divides
   ``n`` (14 = 7 blocks of 2), when ``b > 1``;
2. ``"orthogonal"``: one seeded Haar-random ``n×n`` orthogonal block
   (dense: ``n²`` parameters and work per token, so meant for small widths).
"""

from __future__ import annotations

from typing import Literal

import torch

from quantcompose.errors import TransformError
from quantcompose.transforms.base import Transform
from quantcompose.transforms.hadamard import Hadamard
from quantcompose.transforms.hadamard_matrices import (
    check_hadamard_size,
    hadamard_construction,
    supported_hadamard_size,
)
from quantcompose.transforms.rotation import BlockRotation, random_orthogonal

Fallback = Literal["block", "orthogonal", "error"]
_FALLBACKS = ("block", "orthogonal", "error")

#: Seed of the random orthogonal fallback when no generator is given, so the result is reproducible.
DEFAULT_FALLBACK_SEED = 0


def largest_hadamard_divisor(n: int) -> int:
    """The largest supported Hadamard size that divides ``n`` (1 when only 1 does, e.g. for odd ``n``)."""
    return max(d for d in range(1, n + 1) if n % d == 0 and supported_hadamard_size(d))


def _choose(n: int, fallback: str) -> tuple[str, int]:
    """``("hadamard", n)``, ``("block", b)`` or ``("orthogonal", n)``: what ``hadamard_like`` builds."""
    if fallback not in _FALLBACKS:
        raise TransformError(f"hadamard_like: fallback must be one of {', '.join(map(repr, _FALLBACKS))}, got {fallback!r}.")
    if supported_hadamard_size(n):
        return ("hadamard", n)
    if fallback == "error":
        check_hadamard_size(n)  # raises, naming the nearest supported sizes
    if fallback == "block":
        b = largest_hadamard_divisor(n)
        if b > 1:
            return ("block", b)
    return ("orthogonal", n)


def hadamard_like_description(n: int, fallback: Fallback = "block") -> str:
    """What ``hadamard_like(n, fallback=...)`` returns, in words (no matrix is built)."""
    kind, b = _choose(n, fallback)
    if kind == "hadamard":
        return f"Hadamard: {hadamard_construction(n)}"
    if kind == "block":
        return f"fallback: {n // b} Hadamard blocks of {b} ({hadamard_construction(b)})"
    return f"fallback: random orthogonal {n}×{n}"


def hadamard_like(
    n: int,
    *,
    generator: torch.Generator | None = None,
    fallback: Fallback = "block",
    dtype: torch.dtype = torch.float64,
) -> Transform:
    """An orthogonal transform of width ``n`` that spreads outliers like a Hadamard rotation.

    A ``Hadamard`` when ``n`` is supported (with random signs when a
    ``generator`` is given); otherwise, per ``fallback``: ``"block"`` a
    block-diagonal Hadamard ``BlockRotation`` (random signs with a generator),
    or a random orthogonal one where no block size above 1 divides ``n``;
    ``"orthogonal"`` straight to the random orthogonal ``BlockRotation`` with
    one ``n×n`` block (seeded with ``DEFAULT_FALLBACK_SEED`` without a
    generator); ``"error"`` raises ``HadamardSizeError`` naming the nearest
    supported sizes. :func:`hadamard_like_description` says which, cheaply.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TransformError(f"hadamard_like: width must be a positive int, got {n!r}.")
    kind, b = _choose(n, fallback)
    if kind == "hadamard":
        return Hadamard(n) if generator is None else Hadamard.random(n, generator, dtype)
    if kind == "block":
        block = Hadamard(b).matrix(dtype=dtype)
        if generator is None:
            return BlockRotation.uniform(block, n)
        signs = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(dtype)
        # diag(signs)·H_b/√b per block: the randomized Hadamard, block by block.
        return BlockRotation([signs[i : i + b, None] * block for i in range(0, n, b)])
    g = generator if generator is not None else torch.Generator().manual_seed(DEFAULT_FALLBACK_SEED)
    return BlockRotation([random_orthogonal(n, g, dtype)])
