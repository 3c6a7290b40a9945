"""The abstract :class:`Transform`: an invertible linear map on the last dimension.

Conventions (see ``docs/architecture.md``): row vectors, ``forward(x) == x @ M``
with ``M = T.matrix()``, ``A @ B`` applies ``A`` first, then ``B``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from quantcompose.errors import ShapeError, TransformError

if TYPE_CHECKING:
    from quantcompose.transforms.compose import Compose

#: Every concrete Transform class by name; ``serialize.from_state_dict`` reads it.
TRANSFORM_REGISTRY: dict[str, type["Transform"]] = {}


def cast_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in ``x``'s floating dtype and on ``x``'s device (a no-op when they match).

    Transforms compute in the input's dtype so that a float64 input gets a
    float64-exact result even when the transform stores float32 parameters.
    """
    return t.to(dtype=x.dtype, device=x.device)


def state_equal(a: Any, b: Any) -> bool:
    """Exact (bitwise, dtype-aware) equality of two nested state dicts."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(state_equal(u, v) for u, v in zip(a, b))
    return type(a) is type(b) and a == b


class Transform(ABC):
    """An invertible linear map ``x ↦ x·T`` acting on the last dimension of width ``size``.

    Transforms are immutable value objects: attributes cannot be reassigned
    after construction, and every method returns new tensors or transforms.
    Subclasses implement ``_forward``, ``_make_inverse``, ``_make_transpose``,
    ``state_dict``, ``_from_state`` and ``to``.
    """

    size: int
    _frozen: bool = False
    # Caches and links; private, so they may be written after freezing.
    _PRIVATE_MUTABLE: ClassVar[frozenset[str]] = frozenset({"_inv_cache", "_t_cache", "_inverse_of"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Registered by class name, which is what state_dict()["type"] holds.
        TRANSFORM_REGISTRY[cls.__name__] = cls

    # ------------------------------------------------------------------ immutability
    def _freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen and name not in self._PRIVATE_MUTABLE:
            raise AttributeError(
                f"{type(self).__name__} is immutable; build a new transform instead of setting {name!r}."
            )
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ application
    def _check_width(self, x: torch.Tensor, what: str = "input") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}.")
        if x.dim() == 0 or x.shape[-1] != self.size:
            got = "a scalar" if x.dim() == 0 else f"last dimension {x.shape[-1]} (shape {tuple(x.shape)})"
            raise ShapeError(
                f"{type(self).__name__} of width {self.size} got an {what} with {got}. "
                f"Transforms act on the last dimension: reshape or transpose the {what} so that "
                f"its last dimension has size {self.size}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x·T`` on the last dimension, computed in ``x``'s dtype and device."""
        self._check_width(x)
        return self._forward(x)

    __call__ = forward

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``x·T⁻¹`` on the last dimension."""
        return self.inv.forward(x)

    @abstractmethod
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x·T`` for an ``x`` whose width has already been checked."""

    # ------------------------------------------------------------------ derived maps
    @property
    def inv(self) -> "Transform":
        """The inverse map (cached; ``T.inv.inv is T``)."""
        cached = self.__dict__.get("_inv_cache")
        if cached is None:
            cached = self._make_inverse()
            self._inv_cache = cached
            # Link both ways so Compose.simplify can cancel T followed by T.inv
            # by object identity, and so T.inv.inv returns T itself.
            cached._inverse_of = self
            if cached.__dict__.get("_inv_cache") is None:
                cached._inv_cache = self
        return cached

    @property
    def T(self) -> "Transform":
        """The transposed map: ``T.T.matrix() == T.matrix().T`` (cached)."""
        cached = self.__dict__.get("_t_cache")
        if cached is None:
            cached = self.inv if self.is_orthogonal else self._make_transpose()
            self._t_cache = cached
            if cached.__dict__.get("_t_cache") is None:
                cached._t_cache = self
        return cached

    @abstractmethod
    def _make_inverse(self) -> "Transform":
        """Build the inverse map (called once; ``inv`` caches it)."""

    def _make_transpose(self) -> "Transform":
        """Build the transposed map; only called when ``is_orthogonal`` is False."""
        raise NotImplementedError(f"{type(self).__name__} must implement _make_transpose.")

    def matrix(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense ``n×n`` matrix ``M`` with ``forward(x) == x @ M`` (for tests and small n)."""
        return self.forward(torch.eye(self.size, dtype=dtype, device=device))

    def __matmul__(self, other: "Transform") -> "Compose":
        """``A @ B``: apply ``A`` first, then ``B``."""
        if not isinstance(other, Transform):
            return NotImplemented
        from quantcompose.transforms.compose import Compose

        return Compose([self, other])

    def simplify(self) -> "Transform":
        """An equivalent, possibly smaller transform (atoms are already minimal)."""
        return self

    def derived(self) -> list["Transform"]:
        """The cached inverse and transpose this transform holds (see :meth:`forget_derived`)."""
        return [t for t in (self.__dict__.get("_inv_cache"), self.__dict__.get("_t_cache")) if t is not None]

    def forget_derived(self) -> None:
        """Drop the cached inverse and transpose; they are rebuilt on demand.

        A transform that runs online keeps them after its weight fold
        otherwise, and a computed inverse (``BlockLinear``'s, in float64)
        is larger than the transform itself.
        """
        for cached in self.derived():
            cached.__dict__.pop("_inv_cache", None)
            cached.__dict__.pop("_t_cache", None)
        self.__dict__.pop("_inv_cache", None)
        self.__dict__.pop("_t_cache", None)

    # ------------------------------------------------------------------ folding
    def fold_into_weight(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W·T⁻ᵀ, b)``: a Linear fed ``x·T`` with this weight computes what ``(W, b)`` did on ``x``.

        ``W·T⁻ᵀ`` applies the map ``(T⁻¹)ᵀ`` to each row of ``W``, so no dense
        matrix is ever formed.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ShapeError(f"fold_into_weight expects a 2-D (out, in) weight, got {_shape_of(weight)}.")
        if weight.shape[1] != self.size:
            raise ShapeError(
                f"fold_into_weight: {type(self).__name__} of width {self.size} acts on the layer input, "
                f"but the weight has in_features={weight.shape[1]} (shape {tuple(weight.shape)})."
            )
        new_w = self.inv.T.forward(weight)
        if new_w is weight:  # never hand back an alias of the caller's tensor
            new_w = weight.clone()
        return new_w, (None if bias is None else bias.clone())

    def fold_into_output(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(Tᵀ·W, b·T)``: the folded Linear produces ``y·T`` where ``(W, b)`` produced ``y``."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ShapeError(f"fold_into_output expects a 2-D (out, in) weight, got {_shape_of(weight)}.")
        if weight.shape[0] != self.size:
            raise ShapeError(
                f"fold_into_output: {type(self).__name__} of width {self.size} acts on the layer output, "
                f"but the weight has out_features={weight.shape[0]} (shape {tuple(weight.shape)})."
            )
        # Tᵀ·W == (Wᵀ·T)ᵀ: apply the forward map to the columns of W.
        new_w = self.forward(weight.transpose(0, 1)).transpose(0, 1).contiguous()
        if new_w is weight:
            new_w = weight.clone()
        new_b = None
        if bias is not None:
            if bias.shape != (self.size,):
                raise ShapeError(
                    f"fold_into_output: bias has shape {tuple(bias.shape)}, expected ({self.size},)."
                )
            new_b = self.forward(bias)
            if new_b is bias:
                new_b = bias.clone()
        return new_w, new_b

    # ------------------------------------------------------------------ properties
    @property
    @abstractmethod
    def is_orthogonal(self) -> bool:
        """True when ``T.inv`` equals ``T.T`` exactly by construction."""

    @property
    @abstractmethod
    def is_diagonal(self) -> bool:
        """True when the map is a per-channel scaling (a norm weight can absorb it)."""

    # ------------------------------------------------------------------ conversion and state
    @abstractmethod
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Transform":
        """A new transform with its floating tensors moved to ``device`` / cast to ``dtype``."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """A nested plain dict ``{"type": ClassName, ...}`` that ``from_state_dict`` rebuilds exactly.

        Tensors in it are the transform's own (do not modify them in place).
        """

    @classmethod
    @abstractmethod
    def _from_state(cls, state: dict[str, Any]) -> "Transform":
        """Rebuild from ``state_dict()`` output (``type`` already dispatched)."""

    def __eq__(self, other: object) -> bool:
        """Value equality: same type and bitwise-equal parameters."""
        if not isinstance(other, Transform):
            return NotImplemented
        if other is self:
            return True
        return type(self) is type(other) and self.size == other.size and state_equal(
            self.state_dict(), other.state_dict()
        )

    def __hash__(self) -> int:
        # Coarse but consistent with __eq__ (equal transforms share type and size).
        return hash((type(self).__name__, self.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def _shape_of(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def check_size(size: Any) -> int:
    """Validate a transform width (a positive int)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TransformError(f"A transform width must be a positive int, got {size!r}.")
    return size
