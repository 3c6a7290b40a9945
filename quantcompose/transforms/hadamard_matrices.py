"""Unnormalized ±1 Hadamard matrices: Kronecker products of Paley I/II base orders and Sylvester.

A size ``n`` is supported when ``n = m₁·m₂·…·m_r·2^k`` where each ``mᵢ`` is a
*Paley order* up to ``MAX_BASE_ORDER``: ``q + 1`` (Paley I, prime power
``q ≡ 3 mod 4``) or ``2(q + 1)`` (Paley II, prime power ``q ≡ 1 mod 4``)
(Paley, J. Math. Phys. 12, 1933). The Kronecker product of Hadamard matrices
is a Hadamard matrix, so ``H_n = kron(H_{m₁}, …, H_{m_r}, H_{2^k})``;
``Hadamard`` applies it factor by factor and relies on that order.

Which factors a size gets (its *bases*, the ``mᵢ`` in increasing order):

* a size that has a single base ``m ≤ LEGACY_MAX_BASE_ORDER`` (or none: a power
  of two) keeps the smallest such ``m``, the rule of earlier versions, so that
  transforms saved by them rebuild the same matrix (576 = 36·16, 13824 = 108·128);
* any other size gets the factorisation with the least work per element
  (``Σ mᵢ + k``: each base costs one dense ``mᵢ×mᵢ`` product per channel,
  the Sylvester part ``k`` butterfly stages), e.g. 11008 = 344·32 (Paley I over
  GF(7³)) and 29568 = 12·28·44·2.

Hadamard matrices exist only for orders 1, 2 and multiples of 4; multiples of
4 with no Paley factorisation (92, 116, 156, 172, ...) need constructions this
module does not implement (Williamson, Goethals–Seidel).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from quantcompose.errors import HadamardSizeError
from quantcompose.transforms.galois import difference_codes, prime_power, quadratic_character

#: Largest Paley base order used. A base ``m`` costs an ``m×m`` dense product
#: per channel; 1024 admits 344 (for 11008) while keeping that bounded.
MAX_BASE_ORDER = 1024

#: Sizes with one base up to this order keep the construction of earlier versions.
LEGACY_MAX_BASE_ORDER = 256

#: Dense matrices up to this size are cached by ``hadamard_matrix``.
_CACHE_LIMIT = 4096


@lru_cache(maxsize=None)
def _paley_kind(m: int) -> tuple[str, int] | None:
    """How to build base order ``m``: ``("I", q)``, ``("II", q)`` or None."""
    if m % 4:
        return None  # every Paley order is a multiple of 4
    q = m - 1
    if q % 4 == 3 and prime_power(q) is not None:
        return ("I", q)
    q = m // 2 - 1
    if q % 4 == 1 and prime_power(q) is not None:
        return ("II", q)
    return None


def _is_power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


@lru_cache(maxsize=None)
def base_orders() -> tuple[int, ...]:
    """Every base order ``m ≤ MAX_BASE_ORDER`` with a construction (1, 2 and the Paley orders)."""
    return tuple([1, 2] + [m for m in range(3, MAX_BASE_ORDER + 1) if _paley_kind(m) is not None])


def _valid_size(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def _legacy_bases(n: int) -> tuple[int, ...] | None:
    """The smallest single base ``m ≤ LEGACY_MAX_BASE_ORDER`` with ``n = m·2^k``: ``(m,)``, ``()`` or None."""
    m, candidates = n, []
    while True:
        if m <= 2 or (m <= LEGACY_MAX_BASE_ORDER and _paley_kind(m) is not None):
            candidates.append(m)
        if m % 2:
            break
        m //= 2
    if not candidates:
        return None
    # The smallest base leaves the most work to the O(n log n) butterfly; 1 means a power of two.
    m = min(candidates)
    return () if m <= 2 else (m,)


@lru_cache(maxsize=None)
def _least_work(n: int) -> tuple[int, tuple[int, ...]] | None:
    """``(work, bases)`` minimizing ``Σ bases + log₂(power of two)`` over Paley factorisations of ``n``."""
    if _is_power_of_two(n):
        return (n.bit_length() - 1, ())
    best: tuple[int, tuple[int, ...]] | None = None
    for d in range(12, min(n, MAX_BASE_ORDER) + 1, 4):
        if n % d or _is_power_of_two(d) or _paley_kind(d) is None:
            continue
        rest = _least_work(n // d)
        if rest is not None:
            cand = (rest[0] + d, tuple(sorted(rest[1] + (d,))))
            if best is None or cand < best:
                best = cand
    return best


def hadamard_bases(n: int) -> tuple[int, ...] | None:
    """The Paley base orders of ``hadamard_matrix(n)``, increasing (``()`` for a power of two); None if unsupported."""
    # Validated outside the cache: lru_cache may treat 2.0 or True as the int they equal.
    return _default_bases(n) if _valid_size(n) else None


@lru_cache(maxsize=4096)
def _default_bases(n: int) -> tuple[int, ...] | None:
    legacy = _legacy_bases(n)
    if legacy is not None:
        return legacy
    found = _least_work(n)
    return None if found is None else found[1]


def supported_hadamard_size(n: int) -> bool:
    """True when ``hadamard_matrix(n)`` / ``Hadamard(n)`` can be built."""
    return hadamard_bases(n) is not None


def _describe_base(m: int) -> str:
    name, q = _paley_kind(m)  # type: ignore[misc]  # only called on base orders
    return f"Paley {name} q={q}"


def describe_bases(n: int, bases: tuple[int, ...]) -> str:
    """``"Paley I q=343 ⊗ Sylvester 32"``: the factors of ``kron(H_{m₁}, …, H_{2^k})``, in that order."""
    p = n // math.prod(bases)
    parts = [_describe_base(m) for m in bases]
    if p > 1 or not parts:
        parts.append(f"Sylvester {p}")
    return " ⊗ ".join(parts)


def hadamard_construction(n: int) -> str | None:
    """How ``Hadamard(n)`` is built (``"Paley I q=343 ⊗ Sylvester 32"``), or None when no construction applies.

    Cheap (no matrix is built): strategies call it, or ``require_hadamard_size``,
    before calibration to fail early on a width they cannot rotate.
    """
    bases = hadamard_bases(n)
    return None if bases is None else describe_bases(n, bases)


def nearest_hadamard_sizes(n: int) -> tuple[int | None, int]:
    """The closest supported sizes strictly below (None if there is none) and above ``n``."""
    below = next((k for k in range(n - 1, 0, -1) if supported_hadamard_size(k)), None)
    above = next(k for k in range(max(n + 1, 1), 2 * max(n, 1) + 2) if supported_hadamard_size(k))
    return below, above


def check_hadamard_size(n: int, where: str = "") -> tuple[int, ...]:
    """``hadamard_bases(n)``, or a ``HadamardSizeError`` naming the neighbouring supported sizes.

    ``where`` (e.g. ``"layer 3 mlp_down"``) is named in the message.
    """
    bases = hadamard_bases(n)
    if bases is not None:
        return bases
    at = f" ({where})" if where else ""
    if not _valid_size(n):
        raise HadamardSizeError(f"A Hadamard size must be a positive int, got {n!r}{at}.")
    below, above = nearest_hadamard_sizes(n)
    near = f"{below} below and {above} above" if below is not None else f"{above} above"
    why = (
        "no Hadamard matrix of that order exists (only 1, 2 and multiples of 4 can have one)"
        if n > 2 and n % 4
        else f"it is not a product of Paley orders up to {MAX_BASE_ORDER} and a power of two"
    )
    raise HadamardSizeError(
        f"No Hadamard construction is known for size {n}{at}: {why}. The nearest supported sizes "
        f"are {near}. Use quantcompose.transforms.hadamard_like(n) for a block-diagonal Hadamard or "
        "random orthogonal substitute, or pad / split the channels to a supported size."
    )


def require_hadamard_size(n: int, where: str = "") -> str:
    """``hadamard_construction(n)``, or a ``HadamardSizeError`` naming the nearest supported sizes."""
    return describe_bases(n, check_hadamard_size(n, where))


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


def base_matrix(m: int) -> torch.Tensor:
    """A fresh copy of the unnormalized base matrix of order ``m`` (1, 2 or a Paley order), float64."""
    return _base_matrix(m).clone()


@lru_cache(maxsize=64)
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


_dense_cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}


def check_bases(n: int, bases: tuple[int, ...]) -> tuple[int, ...]:
    """``bases`` as a sorted tuple if they are Paley orders whose product times a power of two is ``n``."""
    out = tuple(sorted(int(m) for m in bases))
    bad = [m for m in out if m < 12 or _is_power_of_two(m) or m > MAX_BASE_ORDER or _paley_kind(m) is None]
    if bad:
        raise HadamardSizeError(
            f"Hadamard bases {list(out)} for size {n}: {bad} are not Paley orders in 12..{MAX_BASE_ORDER} "
            "(powers of two belong to the Sylvester part). Leave bases=None for the default construction."
        )
    prod = math.prod(out)
    if n % prod or not _is_power_of_two(n // prod):
        raise HadamardSizeError(
            f"Hadamard bases {list(out)} (product {prod}) times a power of two cannot make size {n}. "
            "Leave bases=None for the default construction."
        )
    return out


def hadamard_matrix(n: int, bases: tuple[int, ...] | None = None) -> torch.Tensor:
    """The unnormalized ``n×n`` ±1 matrix ``kron(H_{m₁}, …, H_{2^k})`` (float64; ``H·Hᵀ = n·I``).

    ``bases`` defaults to ``hadamard_bases(n)``. Raises ``HadamardSizeError``
    for unsupported ``n``. Returns a fresh copy; matrices up to 4096 are cached.
    """
    bases = check_hadamard_size(n) if bases is None else check_bases(n, bases)
    key = (n, bases)
    cached = _dense_cache.get(key)
    if cached is None:
        cached = sylvester(n // math.prod(bases))
        for m in reversed(bases):
            cached = torch.kron(_base_matrix(m), cached)
        if n <= _CACHE_LIMIT:
            _dense_cache[key] = cached
    return cached.clone()
