"""Just enough finite-field arithmetic for Paley constructions: the quadratic
character of GF(q), q = p^k, as a lookup table.

Elements of GF(p^k) are polynomials over GF(p) modulo a monic irreducible
polynomial of degree k, encoded as integers ``Σ cᵢ·pⁱ`` (so for k = 1 the code
is the residue itself). Fields here are small (q < 1024, the largest Paley
base order), so plain Python loops are fast enough and easy to check.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q == p**k`` and p prime, or None when q is not a prime power."""
    if q < 2:
        return None
    p = 2
    while p * p <= q:
        if q % p == 0:
            break
        p += 1
    else:
        return (q, 1)  # q itself is prime
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """``a mod f`` over GF(p); coefficient lists are lowest degree first, ``f`` monic."""
    a = a[:]
    df = len(f) - 1
    while len(a) - 1 >= df:
        lead = a[-1] % p
        if lead:
            shift = len(a) - 1 - df
            for i, c in enumerate(f):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return [c % p for c in a]


def _poly_mul(a: list[int], b: list[int], p: int) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b):
                out[i + j] = (out[i + j] + x * y) % p
    return out


def _monic_polys(degree: int, p: int):
    """Every monic polynomial of ``degree`` over GF(p), lowest coefficient first."""
    for code in range(p**degree):
        coeffs = []
        for _ in range(degree):
            coeffs.append(code % p)
            code //= p
        yield coeffs + [1]


def _is_irreducible(f: list[int], p: int) -> bool:
    degree = len(f) - 1
    for d in range(1, degree // 2 + 1):
        for g in _monic_polys(d, p):
            if not any(_poly_mod(f, g, p)):
                return False
    return True


@lru_cache(maxsize=None)
def irreducible_polynomial(p: int, k: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree ``k`` over GF(p) (coefficients low to high)."""
    for f in _monic_polys(k, p):
        if _is_irreducible(f, p):
            return tuple(f)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _decode(code: int, p: int, k: int) -> list[int]:
    digits = []
    for _ in range(k):
        digits.append(code % p)
        code //= p
    return digits


def _encode(digits: list[int], p: int) -> int:
    return sum(c * p**i for i, c in enumerate(digits))


@lru_cache(maxsize=None)
def _character_table(q: int) -> tuple[int, ...]:
    pk = prime_power(q)
    if pk is None:
        raise ValueError(f"GF({q}) does not exist: {q} is not a prime power.")
    p, k = pk
    f = list(irreducible_polynomial(p, k))
    chi = [-1] * q
    chi[0] = 0
    for a in range(1, q):
        d = _decode(a, p, k)
        sq = _poly_mod(_poly_mul(d, d, p), f, p) if k > 1 else [(d[0] * d[0]) % p]
        chi[_encode(sq + [0] * (k - len(sq)), p)] = 1
    return tuple(chi)


def quadratic_character(q: int) -> torch.Tensor:
    """χ over GF(q) as an int64 tensor indexed by element code: 0 at 0, 1 on squares, −1 otherwise."""
    return torch.tensor(_character_table(q), dtype=torch.int64)


def difference_codes(q: int) -> torch.Tensor:
    """The ``q×q`` table of codes of ``a − b`` for element codes ``a`` (row) and ``b`` (column)."""
    pk = prime_power(q)
    if pk is None:
        raise ValueError(f"GF({q}) does not exist: {q} is not a prime power.")
    p, k = pk
    codes = torch.arange(q, dtype=torch.int64)
    powers = p ** torch.arange(k, dtype=torch.int64)
    digits = (codes[:, None] // powers) % p  # (q, k)
    # Field subtraction is digit-wise subtraction mod p (addition never carries in GF(p^k)).
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return (diff * powers).sum(-1)
