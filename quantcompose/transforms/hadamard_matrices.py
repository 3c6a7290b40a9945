"""Unnormalized ±1 Hadamard matrices: Paley I/II base orders combined with Sylvester doubling.

A size ``n`` is supported when ``n = m·2^k`` with ``m`` a *base order*: 1, 2,
``q + 1`` (Paley I, prime power ``q ≡ 3 mod 4``) or ``2(q + 1)`` (Paley II,
prime power ``q ≡ 1 mod 4``), ``m ≤ MAX_BASE_ORDER``. Every multiple of 4 up
to 64 is reachable, and so are the LLM widths 576 = 36·16 and 1536 = 12·128.
The full matrix is ``H_n = kron(H_m, H_{2^k})``; ``Hadamard`` relies on that order.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from quantcompose.errors import HadamardSizeError
from quantcompose.transforms.galois import difference_codes, prime_power, quadratic_character

#: Largest Paley base order used. Bigger ones would work but cost an m×m dense
#: matmul per application; 256 keeps that cheap and covers the common widths.
MAX_BASE_ORDER = 256

#: Dense matrices up to this size are cached by ``hadamard_matrix``.
_CACHE_LIMIT = 4096


def _paley_kind(m: int) -> tuple[str, int] | None:
    """How to build base order ``m``: ``("I", q)``, ``("II", q)`` or None."""
    q = m - 1
    if prime_power(q) is not None and q % 4 == 3:
        return ("I", q)
    if m % 2 == 0:
        q = m // 2 - 1
        if prime_power(q) is not None and q % 4 == 1:
            return ("II", q)
    return None


@lru_cache(maxsize=None)
def base_orders() -> tuple[int, ...]:
    """Every base order ``m ≤ MAX_BASE_ORDER`` with a construction (1, 2 and the Paley orders)."""
    return tuple([1, 2] + [m for m in range(3, MAX_BASE_ORDER + 1) if _paley_kind(m) is not None])


def factor_size(n: int) -> tuple[int, int] | None:
    """``(m, p)`` with ``n == m·p``, ``m`` the smallest base order and ``p`` a power of two; None if unsupported."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return None
    orders = set(base_orders())
    m, p = n, 1
    candidates = []
    while True:
        if m in orders:
            candidates.append((m, p))
        if m % 2:
            break
        m, p = m // 2, p * 2
    # The smallest base order leaves the most work to the O(n log n) butterfly.
    return min(candidates) if candidates else None


def supported_hadamard_size(n: int) -> bool:
    """True when ``hadamard_matrix(n)`` / ``Hadamard(n)`` can be built."""
    return factor_size(n) is not None


def nearest_hadamard_sizes(n: int) -> tuple[int | None, int]:
    """The closest supported sizes strictly below (None if there is none) and above ``n``."""
    below = next((k for k in range(n - 1, 0, -1) if supported_hadamard_size(k)), None)
    above = next(k for k in range(max(n + 1, 1), 2 * max(n, 1) + 2) if supported_hadamard_size(k))
    return below, above


def check_hadamard_size(n: int) -> tuple[int, int]:
    """``factor_size(n)``, or a ``HadamardSizeError`` naming the neighbouring supported sizes."""
    f = factor_size(n)
    if f is not None:
        return f
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise HadamardSizeError(f"A Hadamard size must be a positive int, got {n!r}.")
    below, above = nearest_hadamard_sizes(n)
    near = f"{below} below and {above} above" if below is not None else f"{above} above"
    raise HadamardSizeError(
        f"No Hadamard construction is known for size {n}. Supported sizes are m·2^k with m = 1, 2 "
        f"or a Paley order up to {MAX_BASE_ORDER} (12, 20, 28, 36, 44, 52, 60, ...); the nearest are "
        f"{near}. Use a BlockRotation, or pad / split the channels to a supported size."
    )


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[a, b] = χ(a − b)`` over GF(q), as float64."""
    chi = quadratic_character(q)
    return chi[difference_codes(q)].to(torch.float64)


@lru_cache(maxsize=None)
def _base_matrix(m: int) -> torch.Tensor:
    """The unnormalized Hadamard matrix of base order ``m`` (float64, shared: do not modify)."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    kind = _paley_kind(m)
    if kind is None:
        raise HadamardSizeError(f"{m} is not a Paley order.")  # guarded by callers
    name, q = kind
    jac = _jacobsthal(q)
    ones = torch.ones(q, dtype=torch.float64)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = ones
    c[1:, 1:] = jac
    if name == "I":
        # q ≡ 3 mod 4: Q is skew, H = I + [[0, 1ᵀ], [−1, Q]].
        c[1:, 0] = -ones
        return torch.eye(q + 1, dtype=torch.float64) + c
    # q ≡ 1 mod 4: C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix;
    # replace 0 by [[1, −1], [−1, −1]] and ±1 by ±[[1, 1], [1, −1]].
    c[1:, 0] = ones
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, h2) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero_block)


@lru_cache(maxsize=None)
def base_matrix_as(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``_base_matrix(m)`` converted once per dtype and device (the ±1 entries are exact in any float)."""
    return _base_matrix(m).to(dtype=dtype, device=device)


def sylvester(p: int) -> torch.Tensor:
    """The ``p×p`` Sylvester–Hadamard matrix (natural order, symmetric), p a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(h2, h)
    return h


_dense_cache: dict[int, torch.Tensor] = {}


def hadamard_matrix(n: int) -> torch.Tensor:
    """The unnormalized ``n×n`` ±1 Hadamard matrix ``kron(H_m, H_{2^k})`` (float64; ``H·Hᵀ = n·I``).

    Raises ``HadamardSizeError`` for unsupported ``n``. Returns a fresh copy;
    matrices up to 4096 are cached.
    """
    m, p = check_hadamard_size(n)
    cached = _dense_cache.get(n)
    if cached is None:
        cached = torch.kron(_base_matrix(m), sylvester(p))
        if n <= _CACHE_LIMIT:
            _dense_cache[n] = cached
    return cached.clone()
