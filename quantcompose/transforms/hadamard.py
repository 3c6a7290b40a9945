"""The normalized (optionally random-sign) Hadamard rotation, applied in O(n log n)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from quantcompose.errors import TransformError
from quantcompose.transforms._util import as_float_tensor, format_indices
from quantcompose.transforms.base import Transform, cast_like
from quantcompose.transforms.hadamard_matrices import base_matrix_as, check_bases, check_hadamard_size


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh–Hadamard transform over the last dimension (a power of two).

    Equals ``x @ sylvester(p)``. Each of the log₂ p butterfly stages views the
    data as ``(..., pairs, 2, h)`` and writes ``(a + b, a − b)``. Stages are out
    of place (O(n) scratch) so the caller's tensor is never modified and autograd works.
    """
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {p}.")
    batch = x.shape[:-1]
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        y = y.reshape(y.shape[0], p // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*batch, p)


#: Up to this order the Sylvester part is applied as one dense product: a
#: BLAS matmul of p MACs per element beats log₂ p butterfly passes of small
#: ops by far on CPUs and GPUs alike (QuaRot's Q/K Hadamard of 64, SmolLM2's
#: 128 in 1536 = 12·128), while the butterfly keeps huge orders O(n log n).
DENSE_SYLVESTER_MAX = 256


@lru_cache(maxsize=64)
def _sylvester_as(p: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(dtype=dtype, device=device)


def sylvester_apply(x: torch.Tensor) -> torch.Tensor:
    """``x @ sylvester(p)`` over the last dimension (a power of two ``p``): dense up to
    :data:`DENSE_SYLVESTER_MAX`, else :func:`fwht`. The two agree to float rounding."""
    p = x.shape[-1]
    if p <= DENSE_SYLVESTER_MAX and x.is_floating_point() and x.numel():
        if p & (p - 1):
            raise ValueError(f"sylvester_apply needs a power-of-two last dimension, got {p}.")
        return x @ _sylvester_as(p, x.dtype, x.device)
    return fwht(x)


class Hadamard(Transform):
    """The orthonormal map with matrix ``diag(signs)·H/√n`` (``Hᵀ·diag(signs)/√n`` when ``transposed``).

    ``H = kron(H_{m₁}, …, H_{m_r}, H_{2^k})`` from :func:`hadamard_matrix`, with
    the Paley ``bases`` ``mᵢ`` of :func:`hadamard_bases` unless given (a saved
    transform keeps its own). ``forward`` views the input as
    ``(..., m₁, …, m_r, 2^k)``: a butterfly over the ``2^k`` axis and one small
    ``mᵢ×mᵢ`` product over each base axis, ``O(n·(Σ mᵢ + k))`` in all. Paley
    matrices are not symmetric, so ``inv`` / ``T`` is the ``transposed`` variant.
    """

    signs: torch.Tensor | None

    def __init__(
        self,
        size: int,
        signs: torch.Tensor | None = None,
        *,
        transposed: bool = False,
        bases: tuple[int, ...] | None = None,
    ) -> None:
        bases = check_hadamard_size(size) if bases is None else check_bases(size, tuple(bases))
        if signs is not None:
            s = as_float_tensor(signs, "Hadamard signs")
            if s.shape != (size,):
                raise TransformError(f"Hadamard signs must have shape ({size},), got {tuple(s.shape)}.")
            bad = s.abs() != 1
            if bool(bad.any()):
                raise TransformError(
                    f"Hadamard signs must be exactly ±1, but {int(bad.sum())} entries are not "
                    f"(indices {format_indices(bad)}). Use torch.sign (and replace zeros) first, "
                    "or put other factors in a Scale."
                )
            signs = s
        self._init(size, signs, bool(transposed), bases)

    def _init(self, size: int, signs: torch.Tensor | None, transposed: bool, bases: tuple[int, ...]) -> None:
        self.size = size
        self.signs = signs
        self.transposed = transposed
        self.bases = bases
        self._p = size // math.prod(bases)
        self._freeze()

    def _like(self, signs: torch.Tensor | None, transposed: bool) -> "Hadamard":
        """The same construction with other signs / orientation (already validated)."""
        obj = Hadamard.__new__(Hadamard)
        obj._init(self.size, signs, transposed, self.bases)
        return obj

    @classmethod
    def random(
        cls, size: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
    ) -> "Hadamard":
        """A Hadamard rotation with i.i.d. uniform random signs (the QuaRot randomized variant)."""
        check_hadamard_size(size)
        bits = torch.randint(0, 2, (size,), generator=generator)
        return cls(size, (bits * 2 - 1).to(dtype))

    @property
    def base_order(self) -> int:
        """``m₁·…·m_r`` in ``size = m₁·…·m_r·2^k`` (1 for powers of two)."""
        return math.prod(self.bases)

    def _apply_h(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ H`` (or ``x @ Hᵀ`` when transposed), unnormalized."""
        p, n = self._p, self.size
        y = sylvester_apply(x) if not self.bases else sylvester_apply(x.reshape(*x.shape[:-1], n // p, p))
        rows = x.numel() // n  # explicit, not -1: an empty batch must reshape too
        before = 1
        for m in self.bases:
            after = n // (before * m)
            a = base_matrix_as(m, x.dtype, x.device)
            if after == 1:
                # The last base with no Sylvester part: a plain row-vector product.
                y = y.reshape(rows * before, m) @ (a.T if self.transposed else a)
            else:
                # x @ kron(A, B) views x as X (m×after) and returns Aᵀ·X·B; Hᵀ = kron(Aᵀ, B) gives A·X·B.
                y = (a if self.transposed else a.T) @ y.reshape(rows * before, m, after)
            before *= m
        return y.reshape(x.shape)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / math.sqrt(self.size)
        if self.transposed:
            y = self._apply_h(x) * scale
            return y if self.signs is None else y * cast_like(self.signs, x)
        y = x if self.signs is None else x * cast_like(self.signs, x)
        return self._apply_h(y) * scale

    def _make_inverse(self) -> "Hadamard":
        # Orthonormal: inverse == transpose == the other orientation with the same signs.
        return self._like(self.signs, not self.transposed)

    @property
    def is_orthogonal(self) -> bool:
        return True

    @property
    def is_diagonal(self) -> bool:
        return self.size == 1

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Hadamard":
        signs = None if self.signs is None else self.signs.to(device=device, dtype=dtype)
        return self._like(signs, self.transposed)

    def state_dict(self) -> dict[str, Any]:
        # The bases are stored so that a saved transform rebuilds the same matrix even if the
        # default construction for its size changes.
        state: dict[str, Any] = {
            "type": "Hadamard",
            "size": self.size,
            "transposed": self.transposed,
            "bases": list(self.bases),
        }
        if self.signs is not None:
            state["signs"] = self.signs
        return state

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "Hadamard":
        # States saved before "bases" existed used the legacy construction, which is the default for their sizes.
        bases = state.get("bases")
        return cls(
            int(state["size"]),
            state.get("signs"),
            transposed=bool(state.get("transposed", False)),
            bases=None if bases is None else tuple(int(m) for m in bases),
        )

    def __repr__(self) -> str:
        parts = [f"size={self.size}"]
        if self.signs is not None:
            parts.append("signs")
        if self.transposed:
            parts.append("transposed")
        return f"Hadamard({', '.join(parts)})"
